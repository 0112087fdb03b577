LANES: int

def keyed_blocks(key: bytes, data: bytes | bytearray | memoryview, outlen: int,
                 lanes: int = 0) -> bytes: ...
