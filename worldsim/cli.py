"""The `worldsim` console command. This layer only parses options and calls the library.

Each subcommand lives in `worldsim/commands/<name>.py` and imports its heavy dependencies
(torch, MuJoCo, Minari) inside the function, so `worldsim --help` stays instant. Errors a user can
cause (a bad option value, a missing or corrupt file) end with one line, `error: ...`
(`worldsim.commands.common.WorldsimGroup`).
"""

from __future__ import annotations

import functools

import typer

from worldsim.commands.agent import agent_app
from worldsim.commands.bench import bench_app
from worldsim.commands.collect import collect
from worldsim.commands.common import WorldsimGroup, check_model_overrides
from worldsim.commands.dream import dream
from worldsim.commands.evaluate import eval_app
from worldsim.commands.ingest import ingest
from worldsim.commands.pack import pack
from worldsim.commands.plan import plan
from worldsim.commands.play import play
from worldsim.commands.train import train
from worldsim.commands.train_codec import train_codec

app = typer.Typer(
    name="worldsim",
    help="worldsim: long-context state-space video world models as Gymnasium environments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=WorldsimGroup,
)


# `worldsim train` with its --set values checked against ModelConfig's field types first (a bad one
# would otherwise fail deep inside model construction, after the data has loaded). The wrapper
# keeps train's signature and help; `torchrun -m worldsim.commands.train` runs train unchecked.
@functools.wraps(train)
def _train(*args, **kwargs):
    check_model_overrides(kwargs.get("model_overrides") or [])
    return train(*args, **kwargs)


app.command()(collect)
app.command()(ingest)
app.command()(pack)
app.command(name="train-codec")(train_codec)
app.command(name="train")(_train)
app.command()(play)
app.command()(dream)
app.command()(plan)
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")
app.add_typer(agent_app, name="agent")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
