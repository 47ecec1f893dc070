"""The HTTP API.

* ``app``: the Klein application (``LlamaSwapApp``): its routes, the model
  listing, logs, events, metrics, activity and captures, the UI's routes;
* ``front``: ``FrontResource``, what runs before routing (CORS preflight, who
  is asking, what they may call);
* ``http``: small helpers on any ``IRequest`` (headers, query, answers, the
  client's address and principal);
* ``access``: the ``Site``, its request and channel (early refusals, body
  limit, answers to unparseable requests) and the access log;
* ``ui``: the browser UI's files, served at ``/ui/``;
* ``errors``, ``auth``, ``streams``: error bodies, API key helpers, bounded
  streaming responses.

Model-dispatched requests are served by ``llamaswap.proxy.pipeline``, which
uses ``http`` and ``errors`` but not Klein; so this package imports nothing
on its own (import ``llamaswap.server.app`` for the app).
"""
