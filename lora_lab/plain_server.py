"""The server a user would write without ours: the baseline of ``lora-serve-bench --setups plain``.

FastAPI, each adapter merged into its own copy of the base model (``merge_and_unload``: no LoRA branch left in the
forward), one forward per request (tokenized as training did), run by Starlette's thread pool (so requests of
different clients overlap, as a plain synchronous endpoint does). Each adapter runs under the autocast it was
trained in, so its probabilities are predict.py's. The routes the load test needs, as ours: ``POST /v1/classify``
``{"adapter", "texts"}``, ``/readyz`` and ``/healthz`` (with the forward count and the seconds spent in them).

    python -m lora_lab.plain_server sst2=runs/cpu/sst2_lora emotion=runs/cpu/emotion_lora --port 8100 --threads 1

Binds 127.0.0.1 only.
"""

import argparse
import threading
import time
from typing import Optional, Sequence

# The torch-importing modules of lora_train are imported inside the functions that use them, as torch itself is:
# importing this module (a command's --help, a test) stays light.
from lora_train.startup import prepare_process


def build_app(specs: Sequence[str]):
    """Load and merge every adapter (``NAME=SOURCE``); the FastAPI app serving them."""
    import torch
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    from lora_train.data import encode_texts
    from lora_train.inference import load_run, training_autocast
    from lora_train.serving.server import split_name

    models = {}
    for spec in specs:
        name, source = split_name(spec)
        # peft's model as transformers builds it, merged as a user merges it
        run = load_run(source, device="cpu", merge=False, full_last_layer=True)
        run.model = run.model.merge_and_unload().eval()
        models[name or source] = run
    locks = {name: threading.Lock() for name in models}
    stats = {"batches": 0, "requests": 0, "texts": 0, "busy_s": 0.0}
    lock = threading.Lock()

    class Request(BaseModel):
        adapter: str
        texts: list[str]

    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict:
        return {"ready": True, "adapters": sorted(models)}

    @app.get("/healthz")
    def health() -> dict:
        return {"status": "ok", **stats}

    @app.post("/v1/classify")
    def classify(request: Request) -> dict:
        run = models.get(request.adapter)
        if run is None:
            raise HTTPException(404, f"unknown adapter {request.adapter!r}")
        start = time.perf_counter()
        data = run.recipe.data
        with locks[request.adapter]:  # a fast tokenizer's truncation settings are shared state
            enc = encode_texts(
                run.tokenizer, request.texts, data.max_length, data.truncation, padding=True, return_tensors="pt"
            )
        with torch.inference_mode(), training_autocast(run.recipe, torch.device("cpu")):
            probs = torch.softmax(run.model(**enc).logits.float(), dim=-1)
        predictions = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            predictions.append(
                {
                    "label": run.label_names[best],
                    "probability": row[best],
                    "probabilities": dict(zip(run.label_names, row)),
                }
            )
        with lock:
            stats["batches"] += 1
            stats["requests"] += 1
            stats["texts"] += len(request.texts)
            stats["busy_s"] += time.perf_counter() - start
        return {"adapter": request.adapter, "predictions": predictions}

    return app


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", metavar="NAME=SOURCE")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.adapters), host="127.0.0.1", port=args.port, access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
