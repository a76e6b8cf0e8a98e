"""What every peer is asked to do: the same prompt tokens in the same settings; and the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# A fixed English passage; prompts are its first N tokens (batch rows start at different sentences).
PASSAGE = (
    "The history of the city begins with a small settlement on the river, where fishermen traded with farmers from "
    "the hills. Over the centuries the village grew into a market town, and the market town into a city with stone "
    "bridges, a cathedral and a university. Merchants came from distant countries to sell spices, cloth and metal "
    "tools, and scholars came to study medicine, law and astronomy. In the winter the river froze and children "
    "skated between the boats; in the summer the streets were full of music and the smell of bread. The city "
    "survived fires, floods and wars, and each time its people rebuilt the walls, the houses and the schools. Today "
    "it is known for its museums, its gardens and its libraries, which hold books written by hand a thousand years "
    "ago. Visitors walk along the old harbour, climb the tower of the cathedral and eat fresh fish in the small "
    "restaurants near the water. Many of them say that the best time to visit is early autumn, when the trees turn "
    "red and gold and the evenings are still warm enough to sit outside. The university still teaches thousands of "
    "students every year, and its observatory on the hill is open to the public on clear nights."
)

SETTINGS = {  # name: (batch, prompt tokens)
    "b1p16": (1, 16),
    "b1p128": (1, 128),
    "b8p16": (8, 16),
}


def prompt_rows(model_dir: Path, batch: int, length: int) -> list[list[int]]:
    """``batch`` rows of exactly ``length`` token ids from the passage (row i starts at sentence i)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sentences = PASSAGE.split(". ")
    rows = []
    for i in range(batch):
        text = ". ".join(sentences[i:] + sentences[:i])
        ids = tokenizer(text)["input_ids"]
        if len(ids) < length:
            raise SystemExit(f"passage too short for {length} tokens")
        rows.append(ids[:length])
    return rows


ISA_PREFIXES = ("avx2", "avx512", "amx", "avx_vnni", "avxvnni", "fma", "f16c")


def isa_flags() -> list[str]:
    """The CPU's vector ISA flags that MatMulNBits' kernels dispatch on (from /proc/cpuinfo)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(ISA_PREFIXES))
    return []


def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in (
        "qgraph",
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnx-ir",
        "onnxscript",
        "numpy",
        "onnxruntime-genai",
        "matplotlib",
    ):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = None
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(mem, 1) if mem else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1_5_15": os.getloadavg(),
        "versions_main_env": versions,
    }
