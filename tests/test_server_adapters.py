"""Fine-tunes over gRPC on a real server on loopback: the `adapter` field of Generate and Chat, LoadAdapter /
UnloadAdapter / ListAdapters, NOT_FOUND for unknown names, a malformed adapter refused while the server keeps
serving, unloads refused while in use, the LoRA info gauge in /metrics, and the start-up flags."""
from __future__ import annotations

import dataclasses
import json

import grpc
import pytest

from glmserve.engine.config.model_config import MODEL_PRESETS
from glmserve.engine.config.lora_config import LoraConfig
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.entrypoints.cli.main import main
from glmserve.engine.lora.adapter_writer import write_lora_adapter, write_ptuning_checkpoint
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.proto import generation_pb2 as pb

from .server_fixtures import InProcessServer, eventually, parse_metrics, tiny_engine_config

CONFIG = MODEL_PRESETS["glm-tiny"]
PROMPT = [5, 17, 230, 99, 1000, 42, 7, 8]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora-a": write_lora_adapter(root / "lora-a", CONFIG, rank=4, alpha=8, seed=1,
                                     targets=("query_key_value", "dense_h_to_4h")),
        "lora-b": write_lora_adapter(root / "lora-b", CONFIG, rank=8, alpha=16, seed=2, fmt="bin"),
        "pt-a": write_ptuning_checkpoint(root / "pt-a", CONFIG, pre_seq_len=11, prefix_projection=True, seed=3),
    }


def _config(folders):
    return dataclasses.replace(tiny_engine_config(), lora=LoraConfig(
        max_loras=2, lora_adapters=[("lora-a", str(folders["lora-a"]))],
        ptuning_prefixes=[("pt-a", str(folders["pt-a"]))]))


@pytest.fixture(scope="module")
def server(folders):
    srv = InProcessServer(make_engine=lambda: EngineCore(_config(folders)))
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c
        eventually(lambda: c.load().num_running == c.load().num_waiting == 0, 20, "the server going idle")


@pytest.fixture(scope="module")
def expected(folders):
    """Each fine-tune's greedy tokens from an engine of the same config, in-process and alone."""
    engine = EngineCore(_config(folders))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    result = {}
    for adapter in (None, "lora-a", "pt-a"):
        engine.add_request("x", PROMPT, params, adapter=adapter)
        tokens = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens += out.outputs[0].token_ids
        result[adapter] = tokens
    assert len({tuple(t) for t in result.values()}) == 3, "the fine-tunes should change the output"
    return result


def _tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_generate_names_its_adapter(client, expected):
    for adapter in (None, "lora-a", "pt-a"):
        chunks = client.generate(prompt_token_ids=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True,
                                 adapter=adapter or "")
        assert _tokens(chunks) == expected[adapter], adapter


def test_chat_names_its_adapter(client):
    replies = {a: _tokens(client.chat([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.0,
                                      ignore_eos=True, adapter=a)) for a in ("", "lora-a")}
    assert len(replies[""]) == len(replies["lora-a"]) == 5 and replies[""] != replies["lora-a"]


def test_unknown_adapter_is_not_found(client):
    for call in (lambda: list(client.generate("hi", adapter="nope")),
                 lambda: list(client.chat([{"role": "user", "content": "hi"}], adapter="nope")),
                 lambda: client.unload_adapter("nope")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert "'nope' is not loaded" in err.value.details()


def test_load_list_and_unload_at_run_time(client, folders, expected):
    info = client.load_adapter("lora-b", str(folders["lora-b"]))
    assert info.kind == pb.ADAPTER_KIND_LORA and info.rank == 8 and info.host_bytes > 0
    names = {a.name: a for a in client.list_adapters()}
    assert set(names) == {"lora-a", "lora-b", "pt-a"}
    assert names["pt-a"].kind == pb.ADAPTER_KIND_PTUNING and names["pt-a"].pre_seq_len == 11
    assert names["pt-a"].kv_bytes > 0
    tokens = _tokens(client.generate(prompt_token_ids=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True,
                                     adapter="lora-b"))
    assert len(tokens) == 6 and tokens not in expected.values()
    with pytest.raises(grpc.RpcError) as err:
        client.load_adapter("lora-b", str(folders["lora-a"]))
    assert err.value.code() is grpc.StatusCode.ALREADY_EXISTS
    client.unload_adapter("lora-b")
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate(prompt_token_ids=PROMPT, adapter="lora-b"))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_malformed_adapter_names_file_and_tensor_and_the_server_keeps_serving(client, folders, tmp_path, expected):
    import torch
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folders["lora-b"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = torch.load(bad / "adapter_model.bin", weights_only=True)
    name = "base_model.model.transformer.encoder.layers.0.mlp.dense_4h_to_h.lora_B.weight"
    tensors[name] = torch.zeros(3, 8)
    torch.save(tensors, bad / "adapter_model.bin")
    with pytest.raises(grpc.RpcError) as err:
        client.load_adapter("broken", str(bad))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "adapter_model.bin" in err.value.details() and name in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.load_adapter("", str(bad))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "name" in err.value.details()
    assert client.health() == "SERVING"
    assert "broken" not in {a.name for a in client.list_adapters()}
    tokens = _tokens(client.generate(prompt_token_ids=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True,
                                     adapter="lora-a"))
    assert tokens == expected["lora-a"]


def test_unload_in_use_is_refused_until_the_request_ends(client, server):
    stream = client.generate(prompt_token_ids=PROMPT, max_tokens=3000, ignore_eos=True, adapter="pt-a",
                             request_id="long-pt")
    next(stream)
    with pytest.raises(grpc.RpcError) as err:
        client.unload_adapter("pt-a")
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "used by 1 request" in err.value.details()
    assert client.abort("long-pt")
    list(stream)            # ends with finish_reason ABORT
    eventually(lambda: client.load().num_running == 0, 20, "the aborted request leaving")
    client.unload_adapter("pt-a")
    assert "pt-a" not in {a.name for a in client.list_adapters()}
    load = client.load()
    assert load.num_free_blocks == load.num_total_blocks      # its pinned prefix blocks were given back
    client.load_adapter("pt-a", str(server_folder(server)))   # put it back for the other tests


def server_folder(server) -> str:
    return next(path for name, path in server.engine.config.lora.ptuning_prefixes if name == "pt-a")


def test_lora_info_gauge_shows_running_and_waiting_adapters(client, server):
    family = [k for k in parse_metrics(server.metrics_text()) if k[0] == "glmserve_lora_requests_info"]
    assert len(family) == 1 and dict(family[0][1])["max_lora"] == "2"
    stream = client.generate(prompt_token_ids=PROMPT, max_tokens=3000, ignore_eos=True, adapter="lora-a",
                             request_id="long-lora")
    next(stream)

    def running() -> dict:
        series = [k for k in parse_metrics(server.metrics_text()) if k[0] == "glmserve_lora_requests_info"]
        assert len(series) == 1, series      # only the current label set is exported
        return dict(series[0][1])
    eventually(lambda: running()["running_lora_adapters"] == "lora-a", 20, "lora-a running in the gauge")
    assert running()["waiting_lora_adapters"] == ""
    client.abort("long-lora")
    list(stream)
    eventually(lambda: running()["running_lora_adapters"] == "", 20, "no adapter running")


def test_cli_flags_load_adapters_and_bad_ones_exit_2(folders, capsys):
    args = ["generate", "--model", "glm-tiny", "--num-kv-blocks", "64", "--prompt-token-ids",
            ",".join(map(str, PROMPT)), "--max-tokens", "3", "--ignore-eos", "--json"]
    assert main(args + ["--lora", f"a={folders['lora-a']}", "--ptuning", f"p={folders['pt-a']}",
                        "--adapter", "p", "--max-loras", "1", "--max-lora-rank", "8"]) == 0
    assert '"finish_reason": "length"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:          # argparse: usage and a one-line error
        main(args + ["--lora", "no-equals-sign"])
    assert exit_.value.code == 2
    assert "argument --lora: expected NAME=PATH, got 'no-equals-sign'" in capsys.readouterr().err
    assert main(args + ["--lora", f"a={folders['pt-a']}"]) == 2          # not a LoRA folder
    assert "adapter_config.json" in capsys.readouterr().err
    assert main(args + ["--lora", f"a={folders['lora-b']}", "--max-lora-rank", "4"]) == 2
    assert "r = 8 exceeds --max-lora-rank 4" in capsys.readouterr().err
    assert main(args + ["--adapter", "missing"]) == 2
    assert "'missing' is not loaded" in capsys.readouterr().err


def test_adapter_errors_and_answers_cross_the_process_boundary():
    """`glmserve serve` runs the engine core in its own process: what an adapter call sends back is pickled."""
    import pickle

    from glmserve.engine.core.adapters import (AdapterCapacityError, AdapterExistsError, AdapterInUseError,
                                               AdapterKind, AdapterLoadError, UnknownAdapterError)
    from glmserve.engine.lora.manager import AdapterInfo
    from glmserve.engine.runtime.messages import AdapterCallDone, LoadAdapter

    for error in (UnknownAdapterError("nope", ["a", "b"]), AdapterLoadError("x.bin: tensor 't' has shape [1]"),
                  AdapterExistsError("taken"), AdapterInUseError("busy"), AdapterCapacityError("full")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
    info = AdapterInfo("a", AdapterKind.LORA, "/x", 8, None, 100, 0)
    event = pickle.loads(pickle.dumps(AdapterCallDone(3, info, None, (info,), 5, None)))
    assert event.info == info and event.adapters == (info,)
    assert pickle.loads(pickle.dumps(LoadAdapter(1, "a", "/x", AdapterKind.PTUNING))).kind is AdapterKind.PTUNING


def test_http_model_field_names_a_fine_tune(server, client, expected):
    """Over the OpenAI-compatible HTTP API a loaded adapter is a model: listed by /v1/models (with the served model
    as its parent) and run when a request names it, as the inference gateways' model-server protocol asks."""
    import openai
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as api:
        models = {m.id: m for m in api.models.list().data}
        assert {"glm-tiny", "lora-a", "pt-a"} <= set(models)
        assert models["lora-a"].model_extra["parent"] == "glm-tiny"
        for adapter in (None, "lora-a", "pt-a"):
            reply = api.completions.create(model=adapter or "glm-tiny", prompt=PROMPT, max_tokens=6, temperature=0.0,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
            assert reply.model == (adapter or "glm-tiny")
            assert reply.choices[0].model_extra["token_ids"] == expected[adapter], adapter
        with pytest.raises(openai.NotFoundError) as info:
            api.completions.create(model="lora-missing", prompt=PROMPT, max_tokens=2)
        assert "lora-a" in info.value.body["message"]


def _post(server, route: str, payload: dict) -> tuple[int, str]:
    """(status, body text) of a POST to the HTTP API; an error status is returned, not raised."""
    import urllib.error
    import urllib.request
    request = urllib.request.Request(f"{server.base_url.removesuffix('/v1')}{route}", json.dumps(payload).encode(),
                                     {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_http_loads_and_unloads_fine_tunes_as_vllm_does(server, client, folders, expected, tmp_path):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: a loaded fine-tune is a model requests name; a
    bad folder is a 400 naming its file, an unknown name a 404, an unload while in use a 409."""
    import openai
    status, text = _post(server, "/v1/load_lora_adapter", {"lora_name": "lora-b", "lora_path": str(folders["lora-b"])})
    assert status == 200 and "lora-b" in text
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as api:
        assert "lora-b" in {m.id for m in api.models.list().data}
        reply = api.completions.create(model="lora-b", prompt=PROMPT, max_tokens=6, temperature=0.0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
        assert reply.choices[0].model_extra["token_ids"] == _tokens(client.generate(
            prompt_token_ids=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True, adapter="lora-b"))
        status, text = _post(server, "/v1/load_lora_adapter", {"lora_name": "lora-b", "lora_path": str(folders["lora-a"])})
        assert status == 400 and json.loads(text)["error"]["param"] == "lora_name"
        stream = api.completions.create(model="lora-b", prompt=PROMPT, max_tokens=3000, stream=True,
                                        extra_body={"ignore_eos": True})
        next(iter(stream))                                   # in flight: the unload is refused
        status, text = _post(server, "/v1/unload_lora_adapter", {"lora_name": "lora-b"})
        assert status == 409 and "used by 1 request" in json.loads(text)["error"]["message"]
        stream.close()
        eventually(lambda: client.load().num_running == 0, 20, "the closed stream's request leaving")
        status, text = _post(server, "/v1/unload_lora_adapter", {"lora_name": "lora-b"})
        assert status == 200 and "removed" in text
        with pytest.raises(openai.NotFoundError):
            api.completions.create(model="lora-b", prompt=PROMPT, max_tokens=2)
    status, text = _post(server, "/v1/unload_lora_adapter", {"lora_name": "lora-b"})
    assert status == 404 and json.loads(text)["error"]["param"] == "lora_name"
    empty = tmp_path / "empty"
    empty.mkdir()
    status, text = _post(server, "/v1/load_lora_adapter", {"lora_name": "nothing", "lora_path": str(empty)})
    assert status == 400 and json.loads(text)["error"]["param"] == "lora_path", text
    status, text = _post(server, "/v1/load_lora_adapter", {"lora_name": "missing-path"})
    assert status == 400 and "lora_path" in text
