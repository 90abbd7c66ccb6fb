"""The evaluator's records: what a recipe's process measures, a recipe's result, an utterance
row and the spec a recipe's process runs from. results.json and utterances.csv are their
serialisation (results.json's schema: docs/methodology.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

OK, FAILED = "ok", "failed"


@dataclass
class Timing:
    """The benchmark utterance's first call and warm calls (quantkit.evaluate.measure)."""
    first_call_s: float
    warm_s_median: float
    warm_s_p90: float
    gpt_s_median: float
    decode_s_median: float
    steps: int
    ms_per_step: float
    rtf: float
    weight_bytes: int
    decode_weight_bytes: int
    bandwidth_gbs: float
    read_bandwidth_gbs: float
    bandwidth_fraction: float
    bandwidth_runs: list[dict[str, float]]
    # compiled decoding times its decode steps alone (no prompt pass, no ChatTTS work around them)
    step_ms_median: float | None = None
    step_bandwidth_gbs: float | None = None
    step_bandwidth_fraction: float | None = None


@dataclass
class Measurement:
    """Everything one recipe's process measures."""
    load_s: float
    apply_s: float
    timing: Timing
    peak_mem_bytes: int
    device: str
    call_shapes: dict[str, Any] | None = None  # quantkit.shapes.measure_call_shapes
    fidelity: dict[str, Any] | None = None  # quantkit.metrics.Fidelity, against fp32

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "timing"}
        return {**asdict(self.timing), **out}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        timing = Timing(**{f.name: d.get(f.name) for f in fields(Timing)})
        own = {f.name: d.get(f.name) for f in fields(cls) if f.name != "timing"}
        return cls(timing=timing, **own)


@dataclass
class RecipeResult:
    """One recipe's entry in results.json: what its process measured, and what the parent adds
    over every recipe's audio (error rates, DNSMOS, speaker similarity)."""
    name: str
    source: str
    status: str = OK
    error: str | None = None
    config_key: str | None = None
    measured: Measurement | None = None
    error_rate: dict[str, Any] | None = None
    dnsmos: dict[str, dict[str, Any]] | None = None
    speaker_similarity: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        head = {"name": self.name, "status": self.status, "error": self.error, "source": self.source,
                "config_key": self.config_key}
        if not self.ok:
            return head
        return {**head, **self.measured.to_dict(), "error_rate": self.error_rate, "dnsmos": self.dnsmos,
                "speaker_similarity": self.speaker_similarity}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecipeResult:
        measured = Measurement.from_dict(d) if d.get("status") == OK else None
        return cls(name=d["name"], source=d.get("source", d["name"]), status=d.get("status", FAILED),
                   error=d.get("error"), config_key=d.get("config_key"), measured=measured,
                   error_rate=d.get("error_rate"), dnsmos=d.get("dnsmos"),
                   speaker_similarity=d.get("speaker_similarity"))


@dataclass
class Utterance:
    """One text as one recipe spoke it: a row of utterances.csv."""
    recipe: str
    id: str
    text: str
    steps: int
    wav: str  # relative to the eval's output folder
    transcript: str | None = None
    error: float | None = None  # WER or CER against the text, capped at 1
    error_uncapped: float | None = None
    dnsmos: dict[str, float] | None = None  # sig, bak, ovrl, p808
    speaker_similarity: float | None = None  # to fp32's same utterance

    COLUMNS = ("recipe", "id", "steps", "wav", "text", "transcript", "error", "error_uncapped",
               "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808", "speaker_similarity")

    def row(self) -> dict[str, Any]:
        """The CSV row."""
        d = asdict(self)
        return {**d, **{f"dnsmos_{k}": v for k, v in (self.dnsmos or {}).items()}}


@dataclass
class WorkerSpec:
    """What one recipe's process runs: the eval's configuration (EvalConfig as a dict), the
    recipe, and where its files go."""
    config: dict[str, Any]
    recipe: str  # a name or a .toml path
    result: str  # the JSON the process writes: {"result": Measurement, "utterances": [...]} or {"error"}
    audio: str  # the folder for its wavs
    reference: str | None  # fp32's reference tensors, for teacher forcing (None: none yet)
    save_reference: str | None = None  # fp32 only: where to write them
