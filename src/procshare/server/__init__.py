"""procshare's manager side: the accept loop and dispatch (`server`), the
registry of objects and references (`registry`), the hosted primitives
(`primitives`), the lock table (`locktable`) and the current call
(`callctx`).  It never imports `procshare.client`."""
