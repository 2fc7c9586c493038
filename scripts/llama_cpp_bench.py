"""llama.cpp on the same random Qwen2.5-0.5B weights as ebb's decode
benchmark, measured the same way: aggregate decode tokens/s with 1 and 8
sequences (32-token prompts, 16 steps, prefill not timed) and prefill
tokens/s of one 128-token prompt, at the same thread count. Adds the
`llama_cpp` entry to target/bench/decode.json and prints every ratio.

Run by scripts/bench-peer (which installs llama-cpp-python and writes the
GGUF files); not a test.
"""

import argparse
import ctypes
import json
import time

import llama_cpp as L

STEPS = 16
PROMPT = 32
PREFILL = 128


def prompt_tokens(length, salt):
    # The same ids as the Rust benchmark's prompt_tokens (any ids do: the
    # weights are random and the cost does not depend on them).
    return [1000 + (i * 7 + salt * 131) % 50_000 for i in range(length)]


class Engine:
    def __init__(self, path, threads, sequences, repack=True):
        L.llama_backend_init()
        model_params = L.llama_model_default_params()
        model_params.use_extra_bufts = repack
        self.model = L.llama_model_load_from_file(path.encode(), model_params)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        params = L.llama_context_default_params()
        params.n_ctx = 4096
        params.n_batch = 512
        params.n_ubatch = 512
        params.n_seq_max = sequences
        params.n_threads = threads
        params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context")
        self.batch = L.llama_batch_init(512, 0, sequences)

    def decode(self, items):
        """items: (token, position, sequence, wants_logits) tuples, one batch."""
        batch = self.batch
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        code = L.llama_decode(self.ctx, batch)
        if code != 0:
            raise SystemExit(f"llama_decode returned {code}")

    def clear(self):
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def prefill_rate(self):
        tokens = prompt_tokens(PREFILL, 1)
        self.clear()
        self.decode([(t, p, 0, p == len(tokens) - 1) for p, t in enumerate(tokens)])  # warm-up
        self.clear()
        started = time.perf_counter()
        self.decode([(t, p, 0, p == len(tokens) - 1) for p, t in enumerate(tokens)])
        return PREFILL / (time.perf_counter() - started)

    def aggregate_rate(self, sequences):
        self.clear()
        for seq in range(sequences):
            tokens = prompt_tokens(PROMPT, seq)
            self.decode([(t, p, seq, p == PROMPT - 1) for p, t in enumerate(tokens)])
        started = time.perf_counter()
        for step in range(STEPS):
            self.decode([(500 + seq, PROMPT + step, seq, True) for seq in range(sequences)])
        return sequences * STEPS / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help="folder with peer-f16.gguf and peer-q8_0.gguf")
    parser.add_argument("--json", required=True, help="decode.json to add the llama_cpp entry to")
    args = parser.parse_args()
    with open(args.json) as f:
        document = json.load(f)
    threads = document["threads"]
    peer = {"threads": threads, "version": L.__version__}
    # ebb format -> llama.cpp file with the same matrices, and whether
    # llama.cpp may repack the weights for its extra CPU buffer types. Its
    # AMX repack of Q8_0 crashes llama.cpp (SIGSEGV) on CPUs that report
    # amx_tile to a VM that cannot run it (seen on the development machine);
    # without it llama.cpp runs its AVX-512/AVX2 kernels on the file's layout.
    for ours, file, repack in [
        ("f16", "peer-f16.gguf", True),
        ("gguf-q8_0", "peer-q8_0.gguf", False),
    ]:
        if ours not in document.get("formats", {}):
            continue
        engine = Engine(f"{args.models}/{file}", threads, 8, repack)
        figures = {
            "repack": repack,
            "aggregate_tokens_per_s": {"1": engine.aggregate_rate(1), "8": engine.aggregate_rate(8)},
            "prefill_tokens_per_s": engine.prefill_rate(),
        }
        ebb = document["formats"][ours]
        figures["ratio_1"] = ebb["aggregate_tokens_per_s"]["1"] / figures["aggregate_tokens_per_s"]["1"]
        figures["ratio_8"] = ebb["aggregate_tokens_per_s"]["8"] / figures["aggregate_tokens_per_s"]["8"]
        figures["prefill_ratio"] = ebb["prefill_tokens_per_s"] / figures["prefill_tokens_per_s"]
        peer[ours] = figures
        print(
            f"{ours} vs llama.cpp {file}: llama.cpp {figures['aggregate_tokens_per_s']['1']:.1f} tok/s at 1, "
            f"{figures['aggregate_tokens_per_s']['8']:.1f} at 8, prefill {figures['prefill_tokens_per_s']:.0f} tok/s; "
            f"ebb/llama.cpp: ratio_1 {figures['ratio_1']:.2f}, ratio_8 {figures['ratio_8']:.2f}, "
            f"prefill_ratio {figures['prefill_ratio']:.2f}"
        )
    # The headline ratios: ebb's f16 path against llama.cpp's F16 GGUF.
    headline = peer.get("f16") or next(v for k, v in peer.items() if isinstance(v, dict))
    for key in ("ratio_1", "ratio_8", "prefill_ratio"):
        peer[key] = headline[key]
    document["llama_cpp"] = peer
    with open(args.json, "w") as f:
        json.dump(document, f, indent=2)
    print(f"wrote the llama_cpp entry to {args.json}")


if __name__ == "__main__":
    main()
