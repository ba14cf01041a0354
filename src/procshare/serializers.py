"""The public face of procshare's serializers (they live in `procshare.wire.serializers`).

Owns: nothing; it names what users call: `register_serializer(name, factory)`,
`available_serializers()`, `get_serializer(name)` and the `Serializer` base class.
"""

from .wire.serializers import (
    Serializer,
    available_serializers,
    get_serializer,
    register_serializer,
)

__all__ = ["Serializer", "register_serializer", "available_serializers", "get_serializer"]
