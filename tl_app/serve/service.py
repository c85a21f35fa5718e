"""What REST and gRPC share: model lookup, the image pixel budget, the runners, retry on a removed latest.

Both front ends turn a request into numpy inputs and call ``Service.predict``;
models, batching, limits and metrics are one set for both.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor

import numpy as np
from starlette.concurrency import run_in_threadpool

from tl_app.core.config import ServeConfig
import tl_app.serve.codec as codec
from tl_app.serve.batching import Unavailable
from tl_app.serve.codec import BadRequest, TooLarge
from tl_app.serve.limits import PixelBudget
from tl_app.serve.registry import ModelVersion, Registry, short

LATEST_RETRIES = 3  # a request for the latest version retries on the next newest when its version is removed


class Service:
    def __init__(self, registry: Registry, settings: ServeConfig, executor: Executor, metrics):
        self.registry = registry
        self.settings = settings
        self.executor = executor
        self.metrics = metrics
        self.budget = PixelBudget(settings.inflight_pixels)
        self.incoming = 0  # predict requests whose bodies are being read (event-loop thread only)

    # ---- models --------------------------------------------------------------------
    async def lookup(self, name: str, version: int | None = None, label: str | None = None) -> ModelVersion:
        if label is not None:
            version = self.registry.resolve_label(name, label)
        model = self.registry.get_loaded(name, version)
        if model is None:
            model = await run_in_threadpool(self.registry.get, name, version)
        return model

    def max_pixels(self, model: ModelVersion) -> int:
        return self.settings.max_pixels or model.max_pixels

    # ---- predict ---------------------------------------------------------------------
    async def predict(self, name: str, version: int | None, label: str | None, signature_name: str | None,
                      parse) -> tuple[ModelVersion, dict, object]:
        """(model, outputs, what ``parse`` returned besides inputs); ``parse(signature) -> (inputs, extra)``.

        A request for the latest version whose version is unloaded under it
        (its folder removed) is run again on the newest version still there.
        """
        for attempt in range(LATEST_RETRIES):
            model = await self.lookup(name, version, label)
            try:
                outputs, extra = await self.run(model, signature_name, parse)
                return model, outputs, extra
            except Unavailable:
                if version is not None or label is not None or attempt == LATEST_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def run(self, model: ModelVersion, signature_name: str | None, parse) -> tuple[dict, object]:
        model.arriving += 1  # tells the batcher more work is on its way
        try:
            signature = model.signature(signature_name)
            # base64, image headers and any Pillow decode in one worker-thread hop, off the event loop
            started = time.perf_counter()
            inputs, extra, pixels = await run_in_threadpool(self.parse_and_prepare, model, signature, parse)
            self.metrics.stage(model.name, "decode", time.perf_counter() - started)
            try:
                runner = model.runner(signature, inputs, self.settings, self.executor, self.metrics,
                                      incoming=lambda: self.incoming)
            except BaseException:
                self.budget.release(pixels)
                raise
        finally:
            model.arriving -= 1
        try:
            return await runner.submit(inputs), extra
        finally:
            self.budget.release(pixels)

    def parse_and_prepare(self, model: ModelVersion, signature, parse) -> tuple[dict, object, int]:
        """(inputs, extra, pixels taken from the budget): the caller releases the pixels."""
        inputs, extra = parse(signature)
        out, total = {}, 0
        try:
            for name, values in inputs.items():
                if values.dtype != object or not name.endswith("_bytes"):
                    out[name] = values
                    continue
                out[name], pixels = self.prepare_all(model, values)
                total += pixels
        except BaseException:
            self.budget.release(total)
            raise
        return out, extra, total

    def prepare_all(self, model: ModelVersion, datas) -> tuple[np.ndarray, int]:
        """Every header read, the request's pixels taken from the budget, then decoded (in a worker thread)."""
        opened = []
        try:
            for i, data in enumerate(datas):
                opened.append(codec.open_image(data, i, self.max_pixels(model), self.settings.image_pixels))
        except BaseException:
            for item in opened:
                item.image.close()
            raise
        pixels = sum(item.pixels for item in opened)
        if pixels > self.budget.total:
            for item in opened:
                item.image.close()
            raise TooLarge(f"The request's images decode to {pixels} pixels, over the server's budget of "
                           f"{self.budget.total} (--inflight-pixels); send fewer or smaller images per request.")
        try:
            self.budget.acquire(pixels, timeout=self.settings.body_timeout_s)
        except BaseException:
            for item in opened:
                item.image.close()
            raise
        try:
            array = np.empty(len(opened), dtype=object)
            for i, item in enumerate(opened):
                try:
                    array[i] = item.finish(model.background)
                except BadRequest as exc:
                    raise BadRequest(str(exc).replace("Image:", f"Image {i}:", 1)) from None
            return array, pixels
        except BaseException:
            for item in opened:
                item.image.close()
            self.budget.release(pixels)
            raise

    async def classify(self, name, version, label, images: np.ndarray, verdicts: list | None = None):
        """(model, [[(class name, score), ...] per image]) in the card's class order, as a classify signature gives.

        ``verdicts``, when given, receives per image {ood_score, unknown, label, top_class} from a model
        exported with an OOD scorer (its graph's outputs), or None per image for one without.
        """
        def parse(signature):
            input_name = next(iter(signature.inputs))
            return {input_name: images}, None

        model, outputs, _ = await self.predict(name, version, label, None, parse)
        if not model.classes or "probabilities" not in outputs:
            raise BadRequest(f"Model {short(name)} has no class list (not a tl-app export): use :predict.")
        results = []
        for row in outputs["probabilities"]:
            results.append([(label_, row[j]) for j, label_ in enumerate(model.classes)])
        if verdicts is not None:
            verdicts.extend(ood_verdicts(outputs, model.classes))
        return model, results


def ood_verdicts(outputs: dict, classes: list[str]) -> list:
    """Per image {ood_score, unknown, label, top_class} from the graph's outputs; None per image without them."""
    probabilities = np.asarray(outputs["probabilities"])
    if "ood_score" not in outputs or "unknown" not in outputs:
        return [None] * len(probabilities)
    out = []
    for i, row in enumerate(probabilities):
        top = classes[int(np.argmax(row))]
        unknown = bool(np.asarray(outputs["unknown"])[i])
        out.append({"ood_score": float(np.asarray(outputs["ood_score"])[i]), "unknown": unknown,
                    "label": "unknown" if unknown else top, "top_class": top})
    return out
