""""Plan now": a dry run first (placement diff, predicted gain), then publish only on confirmation."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, DataTable, LoadingIndicator, Static

from balancerd.tui.dialog_screen import DialogScreen
from balancerd.tui.model import NOT_REPORTED, Client, call, fmt_num


class PlanScreen(DialogScreen[bool]):
    """Asks the daemon for a dry run of the job's policy and shows it; dismisses with True when the
    operator publishes (y), False on cancel (escape). The dry run runs in a worker."""

    DEFAULT_CSS = """
    PlanScreen > Vertical { width: 90; }
    PlanScreen #plan-heading { text-style: bold; }
    PlanScreen VerticalScroll { height: auto; max-height: 70vh; }
    PlanScreen LoadingIndicator { height: 3; }
    PlanScreen DataTable { height: auto; max-height: 8; margin-top: 1; }
    PlanScreen #plan-note { color: $text-muted; margin-top: 1; }
    """

    BINDINGS = [
        Binding("y", "publish", "publish"),
        Binding("escape", "cancel", "cancel"),
        Binding("n", "cancel", "cancel", show=False),
    ]

    class Previewed(Message):
        """The dry run's answer, or why there is none."""

        def __init__(self, response: dict | None, error: str | None) -> None:
            super().__init__()
            self.response, self.error = response, error

    def __init__(self, client: Client, job: str) -> None:
        super().__init__()
        self.client, self.job = client, job
        self.preview: dict | None = None

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"Plan now for job {self.job}: dry run", id="plan-heading", markup=False)
            with VerticalScroll():
                yield LoadingIndicator()
                yield Static(id="plan-summary")
                yield DataTable(id="plan-layers", cursor_type="row")
                yield DataTable(id="plan-diff", cursor_type="row")
                yield Static(id="plan-note")
            with Horizontal():
                yield Button("Publish (y)", variant="warning", id="publish", disabled=True)
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        for table in self.query(DataTable):
            table.display = False
        self.query_one("#cancel", Button).focus()
        self.dry_run()

    @work(thread=True, group="dry-run")
    def dry_run(self) -> None:
        response, error = call(self.client, {"op": "plan", "job": self.job, "dry_run": True})
        self.post_message(self.Previewed(response, error))

    @on(Previewed)
    def _show(self, message: Previewed) -> None:
        self.query_one(LoadingIndicator).display = False
        summary = self.query_one("#plan-summary", Static)
        if message.response is None:
            summary.update(Text(f"The dry run failed: {message.error}", style="bold red"))
            return
        self.preview = p = message.response
        summary.update(_summary(p))
        layers = self.query_one("#plan-layers", DataTable)
        if p.get("worst_layers"):
            layers.add_columns("layer", "max/mean now", "after", "moves")
            for w in p["worst_layers"]:
                layers.add_row(w["layer"], f"{w['before']:.3f}", f"{w['after']:.3f}", w["moves"])
            layers.display = True
        diff = self.query_one("#plan-diff", DataTable)
        note = ["Publishing asks the daemon to plan again from its window at that moment, so the plan can "
                "differ slightly from this preview. The daemon logs it with your uid."]
        if "diff" in p:
            diff.add_columns("layer", "slot", "GPU", "expert before", "expert after")
            for d in p["diff"]:
                diff.add_row(d["layer"], d["slot"], d["gpu"], d["from"], d["to"])
            diff.display = bool(p["diff"])
            if p.get("diff_truncated"):
                note.insert(0, f"The diff lists the first {len(p['diff'])} slot moves; "
                               f"{p['diff_truncated']} more are not shown.")
        elif p.get("policy") == "placement":
            note.insert(0, f"Slot-by-slot placement diff: {NOT_REPORTED} (moves per layer only).")
        self.query_one("#plan-note", Static).update("\n".join(note))
        self.query_one("#publish", Button).disabled = False

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "publish":
            self.action_publish()
        else:
            self.action_cancel()

    def action_publish(self) -> None:
        if self.preview is not None:
            self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


def _summary(p: dict) -> Text:
    """The dry run in a few lines: what changes, the predicted gain against the migration cost."""
    text = Text(f"policy {p['policy']}")
    if "moves" in p:
        before, after = p["balancedness_before"], p["balancedness_after"]
        text.append(f": {p['moves']} slot moves on {p['layers_changed']} layers\n")
        text.append(f"balancedness (max/mean) mean {before['mean']} → {after['mean']}, "
                    f"worst {before['worst']} → {after['worst']}\n")
        text.append(f"predicted gain {fmt_num(p['predicted_gain_s'])} s ", style="bold green")
        text.append(f"against migration {fmt_num(p['migration_cost_s'])} s\n")
    elif "capacity_factor" in p:
        text.append(f": capacity factor {p['capacity_factor']:g}\n")
    elif "biased_experts" in p:
        text.append(f": {p['biased_experts']} experts biased, down to {p['bias_min']:.3g}\n")
    verdict = "would push it" if p["would_push"] else "would not push it"
    text.append(f"The policy on its own {verdict}: {p['reason']}", style="" if p["would_push"] else "yellow")
    return text
