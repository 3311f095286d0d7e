"""HTTP service for SAM-HQ on Ray Serve (the ``serve`` extra: ``pip install samhq-fast[serve]``).

Never imported by ``import samhq_fast``. ``samhq_fast.serve.config`` needs no Ray;
``samhq_fast.serve.app`` holds the deployments and :func:`~samhq_fast.serve.app.build_app`,
the builder a Ray Serve config file points at. Start it with ``samhq-fast serve``.
"""

from samhq_fast.serve.config import ServeConfig, dump_serve_config, serve_config

__all__ = ["ServeConfig", "dump_serve_config", "serve_config"]
