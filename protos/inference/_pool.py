"""Private descriptor pool for the generated ``inference`` modules.

tritonclient registers Triton's own ``grpc_service.proto`` / ``model_config.proto``
(package ``inference``) in protobuf's *default* descriptor pool. Our protos define
the very same symbols (that is the point: they are wire-compatible), so adding
them to the default pool as well fails with ``duplicate symbol`` as soon as both
are imported into one process. ``protos/generate.py`` rewrites the generated
``*_pb2.py`` modules to add their descriptors to ``POOL`` below instead.

Consequence for callers: look our descriptors up through ``POOL`` (or through the
message classes), not through ``descriptor_pool.Default()`` / the default symbol
database. gRPC server reflection needs ``pool=POOL`` for the same reason.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
