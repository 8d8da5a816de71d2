"""``sluice up``: the whole stack (etcd, model services, gateway, Envoy) on one machine."""
