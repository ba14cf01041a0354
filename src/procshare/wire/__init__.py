"""procshare's wire layer, sans-IO: frames, kinds, records, the handshake,
serializers and the diagnosis of unserializable values.  Nothing here touches
a socket; nothing here imports procshare outside `wire/` except `errors`."""
