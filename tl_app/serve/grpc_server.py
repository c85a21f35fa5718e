"""TF Serving's gRPC API on a second port: PredictionService (Predict, Classify, GetModelMetadata) and
ModelService.GetModelStatus, with the protos `tensorflow-serving-api` ships, so TF Serving's own client
stubs talk to it unchanged.

It runs on the REST server's event loop (grpc.aio) and goes through the same
``Service``: one set of models, batchers, pixel budget, limits and token
(``authorization: Bearer TOKEN`` metadata).
"""

from __future__ import annotations

import hmac
import logging
import time

import numpy as np
from starlette.concurrency import run_in_threadpool

from tl_app.serve.batching import InferenceError, Unavailable
from tl_app.serve.codec import BadRequest, TooLarge, shape_text
from tl_app.serve.limits import Busy
from tl_app.serve.registry import NotFound, short

log = logging.getLogger("tl_app.serve")


def grpc_codes():
    import grpc

    return [(BadRequest, grpc.StatusCode.INVALID_ARGUMENT), (InferenceError, grpc.StatusCode.INVALID_ARGUMENT),
            (NotFound, grpc.StatusCode.NOT_FOUND), (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
            (Unavailable, grpc.StatusCode.UNAVAILABLE), (Busy, grpc.StatusCode.UNAVAILABLE)]


def spec_of(model_spec) -> tuple[str, int | None, str | None]:
    version = model_spec.version.value if model_spec.HasField("version") else None
    label = model_spec.version_label or None
    return model_spec.name, version, label


def tensor_inputs(request_inputs, signature, max_images: int) -> dict:
    """PredictRequest.inputs (TensorProtos) to numpy arrays of the signature's dtypes and shapes, or BadRequest."""
    import tensorflow as tf

    names = set(signature.inputs)
    given = set(request_inputs)
    if given != names:
        raise BadRequest(f"inputs must have exactly the keys {sorted(names)}; got {sorted(given)[:10]}.")
    out = {}
    for name, proto in request_inputs.items():
        spec = signature.inputs[name]
        try:
            array = tf.make_ndarray(proto)
        except Exception as exc:
            raise BadRequest(f"Input {name!r} is not a valid TensorProto: {str(exc)[:200]}") from None
        if spec.dtype == tf.string:
            if array.dtype != object:
                raise BadRequest(f"Input {name!r} expects DT_STRING (encoded images), got {array.dtype}.")
        else:
            try:
                array = array.astype(spec.dtype.as_numpy_dtype, casting="same_kind")
            except TypeError:
                raise BadRequest(f"Input {name!r} expects {spec.dtype.name}, got {array.dtype}.") from None
        if spec.shape.rank is not None and array.ndim != spec.shape.rank:
            raise BadRequest(f"Input {name!r} must have shape {shape_text(spec)}, got {list(array.shape)}.")
        for got, want in zip(array.shape[1:], spec.shape[1:]):
            if want is not None and got != want:
                raise BadRequest(f"Input {name!r} must have shape {shape_text(spec)}, got {list(array.shape)}.")
        out[name] = array
    sizes = {len(v) for v in out.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise BadRequest(f"Every input needs the same, non-zero batch size; got {sorted(sizes)}.")
    if sizes.pop() > max_images:
        raise TooLarge(f"More than {max_images} instances in one request (--max-images).")
    return out


def example_images(request_input, input_name: str, max_images: int) -> np.ndarray:
    """The encoded image of each tf.Example of a ClassificationRequest's Input."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples, context = list(request_input.example_list.examples), None
    elif kind == "example_list_with_context":
        examples = list(request_input.example_list_with_context.examples)
        context = request_input.example_list_with_context.context
    else:
        raise BadRequest("input must hold example_list or example_list_with_context.")
    if not examples:
        raise BadRequest("No examples given: send at least one.")
    if len(examples) > max_images:
        raise TooLarge(f"{len(examples)} examples in one request; the limit is {max_images} (--max-images).")
    out = np.empty(len(examples), dtype=object)
    for i, example in enumerate(examples):
        features = dict(context.features.feature) if context is not None else {}
        features.update(example.features.feature)
        feature = features.get(input_name)
        if feature is None:
            bytes_features = [f for f in features.values() if f.WhichOneof("kind") == "bytes_list"]
            feature = bytes_features[0] if len(bytes_features) == 1 else None
        if feature is None or feature.WhichOneof("kind") != "bytes_list" or len(feature.bytes_list.value) != 1:
            raise BadRequest(f"Example {i}: feature {input_name!r} must be a bytes_list with one encoded image.")
        out[i] = feature.bytes_list.value[0]
    return out


def signature_def_map(model):
    """The SignatureDefMap of GetModelMetadata, from the loaded signatures."""
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    out = get_model_metadata_pb2.SignatureDefMap()
    for sig_name, signature in sorted(model.signatures.items()):
        sig = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        for name, spec in signature.inputs.items():
            info = sig.inputs[name]
            info.name = f"{sig_name}_{name}:0"
            info.dtype = tf.as_dtype(spec.dtype).as_datatype_enum
            info.tensor_shape.CopyFrom(spec.shape.as_proto())
        for i, (name, spec) in enumerate(sorted(signature.outputs.items())):
            info = sig.outputs[name]
            info.name = f"StatefulPartitionedCall:{i}"
            info.dtype = tf.as_dtype(spec.dtype).as_datatype_enum
            info.tensor_shape.CopyFrom(spec.shape.as_proto())
        out.signature_def[sig_name].CopyFrom(sig)
    return out


def servicers(service, settings):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)

    codes = grpc_codes()

    def guarded(method_name):
        """Token check, error mapping (status code + message) and metrics around one RPC."""

        def wrap(fn):
            async def run(self, request, context):
                started = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    if settings.token:
                        given = dict(context.invocation_metadata()).get("authorization", "")
                        scheme, _, value = given.partition(" ")
                        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                                 settings.token.encode()):
                            code = grpc.StatusCode.UNAUTHENTICATED
                            await context.abort(code, "Missing or invalid bearer token: send metadata "
                                                      "('authorization', 'Bearer <token>').")
                    return await fn(self, request, context)
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError":
                        raise
                    code = next((c for kind, c in codes if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
                    if code == grpc.StatusCode.INTERNAL:
                        log.exception("internal error on gRPC %s", method_name)
                        message = f"Internal error: {type(exc).__name__}: {str(exc)[:300]}"
                    else:
                        message = str(exc)
                    await context.abort(code, message)
                finally:
                    service.metrics.request("GRPC", method_name, code.name, time.perf_counter() - started)

            return run

        return wrap

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        @guarded("PredictionService/Predict")
        async def Predict(self, request, context):
            name, version, label = spec_of(request.model_spec)

            def parse(signature):
                return tensor_inputs(request.inputs, signature, settings.max_images), signature.name

            model, outputs, signature_name = await service.predict(
                name, version, label, request.model_spec.signature_name or None, parse)
            wanted = set(request.output_filter) or set(outputs)
            unknown = wanted - set(outputs)
            if unknown:
                raise BadRequest(f"output_filter names unknown outputs {sorted(unknown)}; "
                                 f"available: {sorted(outputs)}.")
            response = predict_pb2.PredictResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = model.version
            response.model_spec.signature_name = signature_name
            for key in sorted(wanted):
                response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key]))
            return response

        @guarded("PredictionService/Classify")
        async def Classify(self, request, context):
            name, version, label = spec_of(request.model_spec)
            model = await service.lookup(name, version, label)
            images = example_images(request.input, next(iter(model.signature(None).inputs)), settings.max_images)
            model, results = await service.classify(name, version, label, images)
            response = classification_pb2.ClassificationResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = model.version
            response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
            for row in results:
                classification = response.result.classifications.add()
                for cls, score in row:
                    classification.classes.add(label=cls, score=float(score))
            return response

        @guarded("PredictionService/GetModelMetadata")
        async def GetModelMetadata(self, request, context):
            name, version, label = spec_of(request.model_spec)
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise BadRequest(f"metadata_field must be ['signature_def'] (the one TF Serving supports); "
                                 f"got {[short(f) for f in fields][:5]}.")
            model = await service.lookup(name, version, label)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = model.version
            response.metadata["signature_def"].Pack(signature_def_map(model))
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        @guarded("ModelService/GetModelStatus")
        async def GetModelStatus(self, request, context):
            pb = get_model_status_pb2
            name, version, label = spec_of(request.model_spec)
            if label is not None:
                version = service.registry.resolve_label(name, label)
            entries = await run_in_threadpool(service.registry.status, name, version)
            response = pb.GetModelStatusResponse()
            for entry in entries:
                status = response.model_version_status.add()
                status.version = int(entry["version"])
                status.state = pb.ModelVersionStatus.State.Value(entry["state"])
                status.status.error_code = 0 if entry["status"]["error_code"] == "OK" else 2
                status.status.error_message = entry["status"]["error_message"]
            return response

    return PredictionService(), ModelService(), prediction_service_pb2_grpc, model_service_pb2_grpc


async def start_grpc(service, settings, port: int, echo=None):
    """The gRPC server on ``settings.host:port``, started; None (with one log line) when the port is taken."""
    import grpc

    prediction, models, prediction_grpc, model_grpc = servicers(service, settings)
    limit = settings.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_concurrent_streams", settings.max_connections),
                                      ("grpc.so_reuseport", 0)])
    prediction_grpc.add_PredictionServiceServicer_to_server(prediction, server)
    model_grpc.add_ModelServiceServicer_to_server(models, server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        bound = 0
        log.debug("gRPC bind failed: %s", exc)
    if not bound:
        message = f"[serve] gRPC port {port} is in use: gRPC is off (pass --grpc-port N, or 0)"
        log.warning(message)
        if echo:
            echo(message)
        return None
    await server.start()
    if echo:
        echo(f"[serve] gRPC {host}:{port}  (TF Serving PredictionService, ModelService)")
    return server
