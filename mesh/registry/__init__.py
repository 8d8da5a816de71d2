"""Everything etcd: the client (:mod:`.etcd`), the key schema, the records, the read-side state view
(:mod:`.state`), the registrar services write with, the connection settings and the
``sluice models | status | weights`` commands."""
