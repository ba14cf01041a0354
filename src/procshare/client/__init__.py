"""procshare's client side: sessions and connections to managers (`session`),
fork handling, proxies and their types (`proxy`), reply handling (`replies`)
and scoped timeouts (`scope`).  It never imports `procshare.server`; the
in-process server is reached through `procshare.inprocess`."""
