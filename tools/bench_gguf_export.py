"""Time the GGUF export of an 8B model: Llama-3-8B's shape with random weights (preset ``llama-3-8b``) in
bf16 with a LoRA adapter, from the PEFT model to a q4_k_m file (merge included), on the GPU; and, where
llama-cpp-python is installed, llama.cpp's own quantizer (``llama_model_quantize``, what llama-quantize
runs) from an f16 file of the same model to q4_k_m. Prints and writes a JSON.

    python tools/bench_gguf_export.py --output results/logs/DATE-h200-gguf-export.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import warnings

import torch


def byte_level_tokenizer():
    """A small byte-level BPE tokenizer in Llama 3's style (its ids are a prefix of the model's vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastbench.export.tokenizer_metadata import BPE_PRE_PATTERNS

    split = next(p for p, name in BPE_PRE_PATTERNS.items() if name == "llama-bpe")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3-8b")
    parser.add_argument("--method", default="q4_k_m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory)")
    parser.add_argument("--output", default=None, help="the JSON file to write")
    args = parser.parse_args()

    from fastbench.export import save_pretrained_gguf
    from fastbench.model import FastLanguageModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = args.workdir or tempfile.mkdtemp(prefix="gguf-bench-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained(args.preset, dtype=torch.bfloat16, device=device)
        model = FastLanguageModel.get_peft_model(base, r=args.rank, lora_alpha=args.rank, random_state=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    tok = byte_level_tokenizer()
    result = dict(preset=args.preset, method=args.method, device=torch.cuda.get_device_name() if device == "cuda"
                  else platform.processor(), torch=torch.__version__, lora_rank=args.rank,
                  parameters=sum(p.numel() for p in model.parameters()))

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    path = save_pretrained_gguf(model, os.path.join(workdir, "ours"), tok, args.method)
    result["fastbench_seconds"] = round(time.perf_counter() - start, 2)
    result["fastbench_file_gib"] = round(os.path.getsize(path) / 2**30, 3)
    print(f"fastbench: model -> {args.method} (merge included) {result['fastbench_seconds']} s, "
          f"{result['fastbench_file_gib']} GiB", flush=True)

    try:
        import llama_cpp
    except ImportError:
        result["llama_cpp"] = "not installed"
    else:
        from fastbench.export.schemes import SCHEMES

        start = time.perf_counter()
        f16 = save_pretrained_gguf(model, os.path.join(workdir, "f16"), tok, "f16")
        result["fastbench_f16_seconds"] = round(time.perf_counter() - start, 2)
        os.remove(path)  # room for the reference file
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(__import__("gguf").LlamaFileType[SCHEMES[args.method].file_type])
        params.nthread = os.cpu_count() or 1
        start = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(f16.encode(), os.path.join(workdir, "llama.gguf").encode(), params)
        result["llama_cpp_quantize_seconds"] = round(time.perf_counter() - start, 2)
        result["llama_cpp_quantize_rc"] = rc
        result["llama_cpp_threads"] = params.nthread
        result["llama_cpp_python"] = llama_cpp.__version__
        print(f"llama.cpp: f16 file -> {args.method} {result['llama_cpp_quantize_seconds']} s "
              f"({params.nthread} threads)", flush=True)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
