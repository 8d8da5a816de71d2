"""KServe v2 REST (HTTP/1.1 and JSON, with Triton's binary tensor extension) on the model service.

``codec.py`` turns bodies into data-plane requests and answers back, ``app.py`` is the ASGI
application (routes, errors, compression), ``server.py`` runs it in the service's event loop.
"""
