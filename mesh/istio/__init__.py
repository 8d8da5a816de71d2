"""Istio mesh mode: the pure routing plan (:mod:`.plan`), the ``sluice mesh-sync`` controller that
applies it to VirtualServices (:mod:`.sync`) and its command."""
