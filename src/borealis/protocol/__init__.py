"""Sans-IO protocol codecs: pure parse/serialize, no sockets, no asyncio."""
