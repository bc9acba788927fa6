"""Serving: an OpenAI-compatible chat-completions API with images, and a web playground.

    tessera serve --checkpoint CK            # or, from Python:
    from tessera.serve import ServeSettings, serve
    serve(ServeSettings(checkpoint="CK"), port=8000)
"""

from tessera.serve.app import ServeSettings, create_app, serve

__all__ = ["ServeSettings", "create_app", "serve"]
