"""Serving: an OpenAI-compatible HTTP API (``posttrain serve``) and a terminal chat (``posttrain chat``).

- ``engine.py``: which models are served (a model or run dir, plus LoRA adapters chosen per request)
  and the transformers backend's decoding loop; ``vllm_backend.py``: the optional vLLM backend.
- ``scheduler.py``: the bounded queue and the single generation worker.
- ``schemas.py``: request bodies and the OpenAI error shape; ``app.py``: the FastAPI app.
- ``chat.py``: the interactive chat loop.

Nothing here is imported by training; fastapi and uvicorn are needed by ``app.py`` only.
"""
