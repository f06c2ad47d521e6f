"""Read a train_gpt.py run log (LOG_DIR/<RUN_ID>.txt): the one parser of its `key:value` format,
used by scripts/summarize.py, scripts/plot.py, bench/compare_runs.py and the tests. No torch.

    from scripts.runlog import read_log
    log = read_log("logs/run_seed1.txt")
    log.hparams["seed"], log.steps[-1].train_loss, log.phase("roundtrip").val_bpb, log.summary["final_val_bpb"]

The lines it knows (other lines are ignored):
  hyperparameters:                                   then one "  key: value" line per knob -> hparams
  step:K/N train_loss:L train_time:Ts step_avg:Mms ...                                  -> steps
  step:K/N val_loss:L val_bpb:B train_time:Ts step_avg:Mms                              -> val_steps
  NAME val_loss:L val_bpb:B [eval_time:Ts] [valid:0|1] ...   an eval phase (prequant,
                                                  roundtrip, sliding, ttt, ...)         -> phases
  error:MESSAGE / warning:MESSAGE                                                       -> errors / warnings
  key:value (one field, no spaces)      the final summary block: the last run of such
                                        lines (warning and error lines may sit among
                                        or after them)                                  -> summary
  any other line of key:value fields (device:, python:, data:, ...) and every single key:value line,
  later lines winning                                                                   -> facts
  and under its own name, so that lines sharing a key keep each value: `NAME k:v ...` (eval_prime,
  artifact_load, warmup_done, ...) as facts["NAME.k"], `first:x k:v ...` (gptq_hessians:, ttt_chunk:, ...)
  as facts["first.k"], the last such line winning                                       -> facts
A last line without its newline (a write cut short) is not read, unless it is an error line.
Values stay strings in `fields`, `hparams`, `facts` and `summary`; the named attributes of Step and
Phase are numbers (nan and inf included, as Python's float() reads them).
"""
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# Knobs that name or place a run's files rather than change what it computes (as the environment spells them).
FILE_KNOBS = {"RUN_ID", "LOG_DIR", "ARTIFACT_DIR", "PREQUANT_SAVE", "DUMP_TOKEN_NLL", "COMPILE_CACHE"}
SINGLE = re.compile(r"^([a-z][a-z0-9_]*):(\S+)$")  # a summary line: one key:value, no spaces
STEP = re.compile(r"^step:(\d+)/(\d+) ")
PHASE = re.compile(r"^([a-z][a-z0-9_]*) (val_loss:\S+ val_bpb:\S+.*)$")


class LogError(ValueError):
    """A log that cannot be read; the message is one line naming the file."""


def fields(line: str) -> dict[str, str]:
    """`a:1 b:x:y c` -> {"a": "1", "b": "x:y"}: whitespace-separated tokens split at their first colon."""
    return dict(t.split(":", 1) for t in line.split() if ":" in t)


def number(text: str | None, unit: str = "") -> float | None:
    """float of a logged value without its unit suffix ("12.5s" -> 12.5); None when absent or not a number."""
    if text is None:
        return None
    try:
        return float(text.removesuffix(unit) if unit else text)
    except ValueError:
        return None


class Scored:
    """val_loss and val_bpb of a line's `fields` (None where absent)."""
    fields: dict[str, str]

    @property
    def val_loss(self) -> float | None:
        return number(self.fields.get("val_loss"))

    @property
    def val_bpb(self) -> float | None:
        return number(self.fields.get("val_bpb"))


@dataclass
class Step(Scored):
    """One `step:K/N ...` line: a train step (train_loss) or an in-training validation (val_loss, val_bpb)."""
    step: int
    total: int
    fields: dict[str, str]

    @property
    def train_loss(self) -> float | None:
        return number(self.fields.get("train_loss"))

    @property
    def train_time(self) -> float | None:
        """Seconds of training clock (0.1 s resolution in the log)."""
        return number(self.fields.get("train_time"), "s")

    @property
    def step_avg_ms(self) -> float | None:
        return number(self.fields.get("step_avg"), "ms")


@dataclass
class Phase(Scored):
    """One eval phase line: `NAME val_loss:L val_bpb:B [eval_time:Ts] [valid:0|1] ...`."""
    name: str
    fields: dict[str, str]

    @property
    def eval_time(self) -> float | None:
        """Seconds; None where the line has no eval_time (prequant, or logs from before it was logged)."""
        return number(self.fields.get("eval_time"), "s")

    @property
    def valid(self) -> bool | None:
        """The logged valid:0|1, None where the line has none (logs from before it was logged)."""
        v = self.fields.get("valid")
        return None if v is None else v == "1"

    @property
    def finite(self) -> bool:
        return all(x is not None and math.isfinite(x) for x in (self.val_loss, self.val_bpb))


@dataclass
class RunLog:
    path: Path
    hparams: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    val_steps: list[Step] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    summary: dict[str, str] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)  # summary keys logged twice in the final block

    @property
    def name(self) -> str:
        return self.path.stem

    def phase(self, name: str) -> Phase | None:
        """The last phase line of that name."""
        return next((p for p in reversed(self.phases) if p.name == name), None)

    @property
    def final_phase(self) -> Phase | None:
        """The phase the final score comes from: the summary's final_phase where logged; else the last
        phase line (other than prequant, the score before quantization) whose val_bpb is the logged
        final_val_bpb; else the last one not marked valid:0; else the last one."""
        if "final_phase" in self.summary:
            return self.phase(self.summary["final_phase"])
        scored = [p for p in self.phases if p.name != "prequant"]
        final = self.summary.get("final_val_bpb")
        return next((p for p in reversed(scored) if p.fields.get("val_bpb") == final),
                    next((p for p in reversed(scored) if p.valid is not False), scored[-1] if scored else None))

    def score_fault(self) -> str | None:
        """Why this log has no final score at all, or None: an error line, no final_val_bpb, or a
        non-finite score (final_val_bpb or any phase's val_loss/val_bpb)."""
        if self.errors:
            return f"run failed: {self.errors[-1]}"
        if "final_val_bpb" not in self.summary:
            return "no final_val_bpb (crashed, still running, or not a train_gpt.py log?)"
        for p in self.phases:
            if not p.finite:
                return f"phase {p.name} scored val_loss:{p.fields.get('val_loss')} val_bpb:{p.fields.get('val_bpb')}"
        bpb = number(self.summary["final_val_bpb"])
        if bpb is None or not math.isfinite(bpb):
            return f"final_val_bpb:{self.summary['final_val_bpb']} is not a finite number"
        if self.repeated:
            return f"summary key {self.repeated[0]} logged twice"
        final = self.phase(self.summary["final_phase"]) if "final_phase" in self.summary else None
        phase_bpb = number(final.fields.get("val_bpb", "")) if final else None
        if phase_bpb is not None and abs(phase_bpb - bpb) > 1e-8:
            return f"final_val_bpb:{self.summary['final_val_bpb']} is not its final phase's ({final.name} {phase_bpb})"
        return None

    def invalid_reason(self) -> str | None:
        """Why this run has no valid final score (for a submission), or None when it has one: a
        score_fault, valid:0 on the final phase, final_valid:0 in the summary (with its invalid_reasons), or
        VAL_MAX_TOKENS set (only part of the val set was scored; logs from before phases said so with valid:0)."""
        if fault := self.score_fault():
            return fault
        final = self.final_phase
        partial = self.hparams.get("val_max_tokens", "0") not in ("0", "")
        named = self.summary.get("invalid_reasons", "none")  # the run's own account, where it gives one
        parts = [r for r in named.split(",") if r != "none" and not (partial and r == "val_subset")] + (
            [f"val_max_tokens:{self.hparams.get('val_max_tokens')}: not the full val set"] if partial else [])
        why = f" ({'; '.join(parts)})" if parts else ""
        if final is not None and final.valid is False:
            return f"final phase {final.name} logged valid:0{why}"
        if self.summary.get("final_valid") == "0":
            return f"final_valid:0{why}"
        if partial:
            return f"val_max_tokens:{self.hparams['val_max_tokens']}: only part of the val set was scored"
        return None


def parse(text: str, path="<log>") -> RunLog:
    log = RunLog(Path(path))
    block: dict[str, str] = {}  # the current run of single key:value lines
    in_hparams = False
    cut = text[text.rfind("\n") + 1:]  # a last line without its newline: a write cut short, its value unsure
    for line in (text[:len(text) - len(cut)] + (cut if cut.startswith("error:") else "")).splitlines():
        if line == "hyperparameters:":
            in_hparams = True
            continue
        if in_hparams and line.startswith("  "):
            k, _, v = line[2:].partition(":")
            log.hparams[k.strip()] = v.strip()
            continue
        in_hparams = False
        if not line.strip():
            continue
        if line.startswith("warning:"):
            log.warnings.append(line[len("warning:"):])
        elif line.startswith("error:"):
            log.errors.append(line[len("error:"):].strip())
        elif m := STEP.match(line):
            step = Step(int(m[1]), int(m[2]), fields(line))
            (log.steps if "train_loss" in step.fields else log.val_steps).append(step)
            block = {}
        elif m := PHASE.match(line):
            log.phases.append(Phase(m[1], fields(m[2])))
            block = {}
        elif m := SINGLE.match(line):
            if not block:
                log.repeated = []  # a new block: only the last one is the summary
            if m[1] in block:
                log.repeated.append(m[1])
            block[m[1]] = m[2]
            log.facts[m[1]] = m[2]
        else:
            head, rest = line.split()[0], fields(line)
            if ":" in head:
                log.facts.update(rest)
            name = head.split(":", 1)[0]
            log.facts.update({f"{name}.{k}": v for k, v in rest.items() if k != name})
            block = {}
    log.summary = block
    return log


def read_log(path) -> RunLog:
    """Parse the log at path; LogError (one line naming it) if it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LogError(f"{path}: cannot read the log ({e.strerror or e})") from None
    return parse(text, path)
