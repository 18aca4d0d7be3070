"""Rendezvous client: the map message codec (:mod:`.messages`), the sans-I/O
:class:`~warp.map_client.client.MapClient` and its asyncio driver (:mod:`.driver`)."""
