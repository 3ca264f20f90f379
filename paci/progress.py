"""Progress of a training run on stderr, from its metrics records: a tqdm bar where stderr is a
terminal, a log line every ~10% of the run otherwise. `paci train` and `Pipeline.fit` both show it."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("paci")


class Progress:
    """Feed it every metrics.jsonl record (`__call__`); `close` at the end. `val`: the record field
    of the validation number shown, its label and format (a language model's perplexity, or a
    loss)."""

    def __init__(self, total_steps: int, evaluates: bool, val: tuple[str, str, str] = ("val_loss", "val loss", ".3f"),
                 quiet: bool = False) -> None:
        self.total, self.evaluates, self.val, self.quiet = total_steps, evaluates, val, quiet
        self.every = max(1, total_steps // 10)
        self.last_val: tuple[float, int] | None = None
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def __call__(self, record: dict) -> None:
        key, label, spec = self.val
        if record.get(key) is not None:
            self.last_val = (record[key], record["step"])
        if self.quiet or "loss" not in record:
            return
        if self.last_val is None:
            shown = "-"
        else:  # the newest validation, and when it was taken if not at this step
            value, at = self.last_val
            shown = format(value, spec) + ("" if at == record["step"] else f" (step {at})")
        line = (f"step {record['step']} | loss {record['loss']:.3f} | " + (f"{label} {shown} | " if self.evaluates else "")
                + f"{record['tok_per_s']:,.0f} tok/s | Δmax {record['max_drift']}")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(line.split(" | ", 1)[1])
        elif record["step"] % self.every == 0 or record["step"] == self.total:
            log.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
