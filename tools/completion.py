"""Shell completion scripts for bash and zsh (`imageledger completion bash|zsh`).

The commands and their options are read from the command line's own parser when the script is
printed, so the script never lists an option the parser does not have. References are asked
of the cache while completing: the script runs ``imageledger [--home DIR] images --quiet``
(a query: it reads the views and loads neither eventsourcing nor the event classes, see
tests/test_cli_imports.py), passing on a ``--home`` already typed on the line.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

# Commands whose positional arguments are cached references (pull's too: pulling a name
# again is how a tag is refreshed), and options whose value is one.
REFERENCE_COMMANDS: Final = frozenset(
    {"inspect", "rm", "save", "use", "history", "explain", "tag", "pull"}
)
REFERENCE_OPTIONS: Final = frozenset({"--ref"})
# Options whose value is a path.
FILE_OPTIONS: Final = frozenset({"-o", "--output", "--tiles", "--key", "--ca-bundle"})
FILE_COMMANDS: Final = frozenset({"load", "verify-export"})


@dataclass(frozen=True)
class Command:
    """One command as completion sees it: its name (``audit verify`` for a subcommand), its
    options, and which of them take a value."""

    name: str
    options: tuple[str, ...]
    valued: tuple[str, ...]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command(name: str, parser: argparse.ArgumentParser) -> Command:
    actions = [a for a in parser._actions if a.option_strings]
    options = [o for a in actions for o in a.option_strings if o.startswith("--")]
    valued = [o for a in actions if a.nargs != 0 for o in a.option_strings]
    return Command(name, tuple(options), tuple(valued))


def commands(parser: argparse.ArgumentParser) -> Iterator[Command]:
    """Every command of `parser` (and every subcommand, as ``audit verify``), in order."""
    for name, sub in _subparsers(parser).items():
        yield _command(name, sub)
        for inner, subsub in _subparsers(sub).items():
            yield _command(f"{name} {inner}", subsub)


@dataclass(frozen=True)
class _Layout:
    """What both scripts are made of: every command, the top-level ones, the subcommands of
    each command that has some, and the options before any command."""

    found: list[Command]
    top: list[str]
    nested: dict[str, list[str]]
    global_options: list[str]
    global_valued: list[str]

    @property
    def valued(self) -> str:
        return " ".join(sorted({o for c in self.found for o in c.valued}))


def _layout(parser: argparse.ArgumentParser) -> _Layout:
    found = list(commands(parser))
    nested: dict[str, list[str]] = {}
    for c in found:
        if " " in c.name:
            outer, inner = c.name.split(" ", 1)
            nested.setdefault(outer, []).append(inner)
    before = _command("", parser)  # the options before any command
    return _Layout(
        found=found,
        top=[c.name for c in found if " " not in c.name],
        nested=nested,
        global_options=list(before.options),
        global_valued=list(before.valued),
    )


def _find_command(layout: _Layout) -> str:
    return _FIND_COMMAND.replace("GLOBAL_VALUED", " ".join(layout.global_valued)).replace(
        "NESTED_NAMES", " ".join(sorted(layout.nested))
    )


_SETS: Final = {
    "references": " ".join(sorted(REFERENCE_COMMANDS)),
    "reference_options": " ".join(sorted(REFERENCE_OPTIONS)),
    "file_options": " ".join(sorted(FILE_OPTIONS)),
    "file_commands": " ".join(sorted(FILE_COMMANDS)),
}


def _shared(layout: _Layout) -> dict[str, str]:
    """What both scripts are filled with alike."""
    return {
        "commands": " ".join(layout.top),
        "global_options": " ".join(layout.global_options),
        "global_valued": " ".join(layout.global_valued),
        "valued": layout.valued,
        "find_command": _find_command(layout),
        **_SETS,
    }


def bash(parser: argparse.ArgumentParser) -> str:
    """The bash script: ``source <(imageledger completion bash)``."""
    layout = _layout(parser)
    return _BASH.format(
        **_shared(layout),
        nested_names=" ".join(sorted(layout.nested)),
        cases="\n".join(
            f'        "{c.name}") options="{" ".join(c.options)}" ;;' for c in layout.found
        ),
        sub_cases="\n".join(
            f'        "{outer}") candidates="{" ".join(inners)}" ;;'
            for outer, inners in layout.nested.items()
        ),
    )


def zsh(parser: argparse.ArgumentParser) -> str:
    """The zsh script: save it as ``_imageledger`` in a directory of ``$fpath``, or
    ``source <(imageledger completion zsh)`` after ``compinit``."""
    layout = _layout(parser)
    return _ZSH.format(
        **_shared(layout),
        options="\n".join(f'    "{c.name}" "{" ".join(c.options)}"' for c in layout.found),
        nested="\n".join(
            f'    "{outer}" "{" ".join(inners)}"' for outer, inners in layout.nested.items()
        ),
    )


# Both scripts find the command (and a subcommand) in the words before the cursor alike:
# options before the command are skipped (with their values), ``--home``'s is kept.
_FIND_COMMAND: Final = r"""        word="${words[i]}"
        if [[ -z "$command" && " GLOBAL_VALUED " == *" $word "* ]]; then
            [[ "$word" == --home ]] && home="${words[i+1]}"
            (( i++ )); continue
        elif [[ "$word" == --home=* ]]; then
            home="${word#--home=}"; continue
        elif [[ "$word" == -* ]]; then
            continue
        fi
        if [[ -z "$command" ]]; then
            command="$word"
            [[ " NESTED_NAMES " == *" $command "* ]] || break
        else
            inner="$word"; break
        fi
"""

_BASH: Final = r"""# bash completion for imageledger (made by `imageledger completion bash`).
# Install: imageledger completion bash > /etc/bash_completion.d/imageledger
#      or: source <(imageledger completion bash)     (in ~/.bashrc)

_imageledger_references() {{
    # The cache's references: a query that reads the views only (fast), on the home typed.
    if [[ -n "$1" ]]; then
        imageledger --home "$1" images --quiet 2>/dev/null
    else
        imageledger images --quiet 2>/dev/null
    fi
}}

_imageledger() {{
    local line cur prev command="" inner="" home="" options="" candidates="" i word
    local -a words
    # The words are read from the line itself: bash splits references at ':' in COMP_WORDS.
    if [[ -n "${{COMP_LINE+set}}" ]]; then
        line="${{COMP_LINE:0:${{COMP_POINT:-${{#COMP_LINE}}}}}}"
        read -ra words <<< "$line"
        if [[ -z "$line" || "$line" =~ [[:space:]]$ ]]; then
            words+=("")
        fi
    else
        words=("${{COMP_WORDS[@]:0:COMP_CWORD+1}}")
    fi
    cur="${{words[${{#words[@]}}-1]}}"
    prev=""
    (( ${{#words[@]}} > 1 )) && prev="${{words[${{#words[@]}}-2]}}"

    for (( i = 1; i < ${{#words[@]}} - 1; i++ )); do
{find_command}    done

    if [[ -z "$command" ]]; then
        if [[ "$cur" == -* ]]; then
            candidates="{global_options}"
        elif [[ "$prev" == --home ]]; then
            COMPREPLY=( $(compgen -d -- "$cur") ); return 0
        elif [[ " {global_valued} " == *" $prev "* ]]; then
            COMPREPLY=( $(compgen -f -- "$cur") ); return 0
        else
            candidates="{commands}"
        fi
    elif [[ " {nested_names} " == *" $command "* && -z "$inner" ]]; then
        case "$command" in
{sub_cases}
        esac
    else
        local name="$command"
        [[ -n "$inner" ]] && name="$command $inner"
        case "$name" in
{cases}
        esac
        if [[ " {reference_options} " == *" $prev "* ]]; then
            candidates="$(_imageledger_references "$home")"
        elif [[ " {file_options} " == *" $prev "* ]]; then
            COMPREPLY=( $(compgen -f -- "$cur") ); return 0
        elif [[ " {valued} " == *" $prev "* ]]; then
            return 0
        elif [[ "$cur" == -* ]]; then
            candidates="$options"
        elif [[ " {references} " == *" $command "* ]]; then
            candidates="$(_imageledger_references "$home")"
        elif [[ " {file_commands} " == *" $name "* || " {file_commands} " == *" $inner "* ]]; then
            COMPREPLY=( $(compgen -f -- "$cur") ); return 0
        elif [[ "$command" == completion ]]; then
            candidates="bash zsh"
        fi
    fi
    COMPREPLY=( $(compgen -W "$candidates" -- "$cur") )
    # What bash replaces is the part of the word after its last ':' (a word break).
    if [[ "$cur" == *:* && "${{COMP_WORDBREAKS:-:}}" == *:* ]]; then
        local prefix="${{cur%"${{cur##*:}}"}}"
        for i in "${{!COMPREPLY[@]}}"; do
            COMPREPLY[i]="${{COMPREPLY[i]#"$prefix"}}"
        done
    fi
    return 0
}}

complete -F _imageledger imageledger
"""

_ZSH: Final = r"""#compdef imageledger
# zsh completion for imageledger (made by `imageledger completion zsh`).
# Install: imageledger completion zsh > "${{fpath[1]}}/_imageledger"   (then compinit)
#      or: source <(imageledger completion zsh)     (in ~/.zshrc, after compinit)

_imageledger() {{
    local -A options nested
    options=(
{options}
    )
    nested=(
{nested}
    )
    local command="" inner="" home="" word i
    local prev="${{words[CURRENT-1]}}" cur="${{words[CURRENT]}}"
    for (( i = 2; i < CURRENT; i++ )); do
{find_command}    done
    local -a refs
    if [[ -z "$command" ]]; then
        if [[ "$prev" == --home ]]; then
            _files -/
        elif [[ " {global_valued} " == *" $prev "* ]]; then
            _files
        elif [[ "$cur" == -* ]]; then
            compadd -- {global_options}
        else
            compadd -- {commands}
        fi
        return
    fi
    if (( ${{+nested[$command]}} )) && [[ -z "$inner" ]]; then
        compadd -- ${{=nested[$command]}}
        return
    fi
    local name="$command"
    [[ -n "$inner" ]] && name="$command $inner"
    local want=""
    if [[ " {reference_options} " == *" $prev "* ]]; then
        want=references
    elif [[ " {file_options} " == *" $prev "* ]]; then
        want=files
    elif [[ " {valued} " == *" $prev "* ]]; then
        return
    elif [[ "$cur" == -* ]]; then
        compadd -- ${{=options[$name]}}
        return
    elif [[ " {references} " == *" $command "* ]]; then
        want=references
    elif [[ " {file_commands} " == *" $name "* || " {file_commands} " == *" $inner "* ]]; then
        want=files
    fi
    if [[ "$want" == references ]]; then
        # The cache's references: a query that reads the views only (fast), on the home typed.
        if [[ -n "$home" ]]; then
            refs=( ${{(f)"$(imageledger --home "$home" images --quiet 2>/dev/null)"}} )
        else
            refs=( ${{(f)"$(imageledger images --quiet 2>/dev/null)"}} )
        fi
        compadd -- $refs
    elif [[ "$want" == files ]]; then
        _files
    elif [[ "$command" == completion ]]; then
        compadd -- bash zsh
    fi
}}

if [[ "$funcstack[1]" == _imageledger ]]; then
    _imageledger "$@"
else
    compdef _imageledger imageledger
fi
"""
