#!/usr/bin/env python3
"""client.py — a Python grpcio client of an infinitehip decode worker, with no .proto file and no
generated stubs: every message type comes from the server's reflection service (what grpcurl and
ghz do).

As a script it:
  1. checks health (grpc.health.v1.Health/Check) of the whole server and of the Generator;
  2. lists the services by reflection (grpc.reflection.v1alpha, as grpcio-reflection speaks it)
     and decodes the descriptor of infinitehip.v1.Generator (methods, request/response types,
     streaming flags);
  3. calls ModelInfo, Tokenize, and streams one Generate, printing each piece as it arrives;
  4. prints one JSON summary line (prefixed "RESULT ") that tests/clients/test_python_client.py
     checks.

Usage: client.py --addr HOST:PORT [--prompt TEXT] [--max-tokens N] [--temperature T] [--seed S]
                 [--timeout SEC]
Needs grpcio, grpcio-reflection, grpcio-health-checking (PyPI). Exit 0 on success, 1 on an RPC
error (the status is printed), 2 on bad usage.

As a module: `Api(channel)` gives dynamic access (message classes, method callables) used by
tests/integration/test_decode_worker.py.
"""
import argparse
import json
import sys
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase


class Api:
    """Our services' methods and message classes, built from the server's reflection."""

    def __init__(self, channel):
        self.channel = channel
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)
        self.gen = self.pool.FindServiceByName("infinitehip.v1.Generator")
        self.admin = self.pool.FindServiceByName("infinitehip.v1.Admin")

    def cls(self, name):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(name))

    def _method(self, svc, name):
        m = svc.FindMethodByName(name)
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        path = f"/{svc.full_name}/{name}"
        if m.client_streaming:
            fn = self.channel.stream_stream
        elif m.server_streaming:
            fn = self.channel.unary_stream
        else:
            fn = self.channel.unary_unary
        return fn(path, request_serializer=req.SerializeToString,
                  response_deserializer=resp.FromString), req

    def method(self, name):
        return self._method(self.gen, name)

    def stats(self):
        call, req = self._method(self.admin, "GetStats")
        r = call(req(), timeout=5)
        return {m.name: m.value for m in r.metrics}

    def generate(self, timeout=None, **fields):
        """Start a Generate stream. fields: prompt=..., tokens=[...], sampling={...},
        max_tokens=N, stop=[...], attention={...}, request_id=..."""
        call, Req = self.method("Generate")
        req = Req()
        if "prompt" in fields:
            req.text = fields.pop("prompt")
        if "tokens" in fields:
            req.tokens.ids.extend(fields.pop("tokens"))
        if "chat" in fields:
            for role, content in fields.pop("chat"):
                m = req.chat.messages.add()
                m.role, m.content = role, content
        for k, v in fields.pop("sampling", {}).items():
            setattr(req.sampling, k, v)
        for k, v in fields.pop("attention", {}).items():
            setattr(req.attention, k, v)
        if "stop" in fields:
            req.stop.extend(fields.pop("stop"))
        for k, v in fields.items():
            setattr(req, k, v)
        return call(req, timeout=timeout)


def collect(stream):
    """Read a whole Generate stream: (text, ids, finished, n_progress)."""
    text, ids, fin, n_prog = [], [], None, 0
    for r in stream:
        kind = r.WhichOneof("event")
        if kind == "piece":
            text.append(r.piece.text)
            ids.extend(r.piece.token_ids)
        elif kind == "progress":
            n_prog += 1
        elif kind == "finished":
            fin = r.finished
    return "".join(text), ids, fin, n_prog


def list_services(channel):
    """Service names by reflection (ListServices)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    resp = next(stub.ServerReflectionInfo(iter([req]), timeout=10))
    return sorted(s.name for s in resp.list_services_response.service)


def describe_service(api, name):
    """The decoded descriptor of one service: {method: (input, output, client_stream,
    server_stream)} plus the file it comes from."""
    svc = api.pool.FindServiceByName(name)
    return svc.file.name, {m.name: (m.input_type.full_name, m.output_type.full_name,
                                    m.client_streaming, m.server_streaming) for m in svc.methods}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    out = {}
    ch = grpc.insecure_channel(a.addr)
    try:
        grpc.channel_ready_future(ch).result(timeout=a.timeout)
        h = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "infinitehip.v1.Generator"):
            st = h.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10).status
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(st)
            print(f"health[{svc or '*'}]: {name}")
            out["health" if not svc else "health_generator"] = name

        services = list_services(ch)
        print("services:", ", ".join(services))
        out["services"] = services
        api = Api(ch)
        fname, methods = describe_service(api, "infinitehip.v1.Generator")
        print(f"infinitehip.v1.Generator (from {fname}):")
        for m, (i, o, cs, ss) in sorted(methods.items()):
            print(f"  rpc {m}({'stream ' if cs else ''}{i}) returns ({'stream ' if ss else ''}{o})")
        out["generator_file"] = fname
        out["generator_methods"] = {m: [i, o, cs, ss] for m, (i, o, cs, ss) in methods.items()}

        call, Req = api.method("ModelInfo")
        mi = call(Req(), timeout=10)
        print(f"model: {mi.model_name} ({mi.architecture}, {mi.n_layer} layers, vocab "
              f"{mi.n_vocab}, {mi.quantization}, fingerprint {mi.fingerprint})")
        out["model"] = {"name": mi.model_name, "n_layer": mi.n_layer, "n_vocab": mi.n_vocab}

        call, Req = api.method("Tokenize")
        tk = call(Req(text=a.prompt, with_pieces=True), timeout=10)
        print(f"prompt tokens: {list(tk.ids)}")
        out["prompt_ids"] = list(tk.ids)

        sampling = {"temperature": a.temperature}
        if a.seed is not None:
            sampling["seed"] = a.seed
        t0 = time.monotonic()
        ttft = None
        text, ids, fin, n_prog = [], [], None, 0
        for r in api.generate(prompt=a.prompt, max_tokens=a.max_tokens, sampling=sampling,
                              timeout=a.timeout):
            kind = r.WhichOneof("event")
            if kind == "piece":
                if ttft is None:
                    ttft = time.monotonic() - t0
                text.append(r.piece.text)
                ids.extend(r.piece.token_ids)
                sys.stdout.write(r.piece.text)
                sys.stdout.flush()
            elif kind == "progress":
                n_prog += 1
            elif kind == "finished":
                fin = r.finished
        sys.stdout.write("\n")
        reason = type(fin).DESCRIPTOR.fields_by_name["reason"].enum_type.values_by_number[
            fin.reason].name if fin else None
        print(f"finish: {reason}, usage: prompt {fin.usage.prompt_tokens}, generated "
              f"{fin.usage.generated_tokens}; ttft {fin.timings.ttft_us / 1000:.1f} ms, "
              f"{fin.timings.per_token_us / 1000:.1f} ms/token")
        out.update(text="".join(text), ids=ids, finish=reason, progress=n_prog,
                   usage={"prompt": fin.usage.prompt_tokens, "cached": fin.usage.cached_tokens,
                          "generated": fin.usage.generated_tokens},
                   ttft_ms=round((ttft or 0) * 1000, 1))
    except grpc.RpcError as e:
        print(f"rpc error: {e.code().name}: {e.details()}")
        print("RESULT " + json.dumps({"error": e.code().name, "details": e.details()}))
        return 1
    except grpc.FutureTimeoutError:
        print(f"cannot connect to {a.addr}")
        return 1
    finally:
        ch.close()
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
