"""The model server: TF Serving's REST API over saved_models/, with dynamic batching.

``tl-app serve saved_models/`` or, from Python::

    from tl_app.serve.app import serve
    from tl_app.core.config import ServeConfig
    serve("saved_models", port=8501, settings=ServeConfig(max_batch_size=32))
"""
