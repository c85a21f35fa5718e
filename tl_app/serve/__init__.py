"""The model server: TF Serving's REST API over saved_models/, with dynamic batching.

``tl-app serve saved_models/`` or, from Python::

    from tl_app.serve import ServeSettings, serve
    serve("saved_models", port=8501, settings=ServeSettings(max_batch_size=32))
"""

from tl_app.serve.app import ServeSettings, create_app, serve

__all__ = ["ServeSettings", "create_app", "serve"]
