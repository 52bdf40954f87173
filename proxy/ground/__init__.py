"""Shared ground: vocabulary, sockets, config and wire formats that every layer above uses."""
