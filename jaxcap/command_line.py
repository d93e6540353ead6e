"""The `--config` flag every script shares: a config file, then `--config.FIELD=VALUE` overrides.

ml_collections parses an override by the field's type, so for a `str` field such as
`model.encoder_weights` the text `None` would be the string 'None'. Fields whose default is None
(`config_dict.placeholder(...)`) can be set back to None with `--config.FIELD=None` (or `none`,
the spelling ml_collections' own dataclass flags accept): the parsers of `str`, `int` and `float`
fields are registered with ml_collections (`config_flags.register_flag_parser_for_type`) to read
it as None, and a validator rejects None for every field whose default is not None.
"""

from __future__ import annotations

import ast

from absl import flags
from ml_collections import config_flags

_NONE_SPELLINGS = ('None', 'none')


def _none_or(parser_class: type[flags.ArgumentParser]) -> flags.ArgumentParser:

  class NoneOr(parser_class):
    """`parser_class`, reading `None` as None."""

    def parse(self, argument):
      if argument is None or argument in _NONE_SPELLINGS:
        return None
      return super().parse(argument)

  return NoneOr()


for _type, _parser in ((str, flags.ArgumentParser), (int, flags.IntegerParser),
                       (float, flags.FloatParser)):
  config_flags.register_flag_parser_for_type(_type, _none_or(_parser))


def _check_none_only_for_placeholders(flag_name: str, flag_values: flags.FlagValues) -> bool:
  """True if every override set to None is a field whose default is None (a placeholder).

  A placeholder keeps its type when set to None; a plain field set to None becomes NoneType."""
  config = flag_values[flag_name].value
  for path, value in config_flags.get_override_values(flag_values[flag_name]).items():
    if value is None:
      parent, _, name = ('.' + path).rpartition('.')
      holder = config
      for part in parent.split('.')[1:]:
        holder = holder[part]
      if holder.get_type(name) is type(None):
        raise flags.ValidationError(
            f'--{flag_name}.{path}=None: only fields whose default is None can be set to None')
  return True


def _report_unknown_fields_as_flag_errors(flag: flags.Flag) -> None:
  """A misspelt `--config.FIELD` raises AttributeError inside ml_collections' parser; as absl's
  flag error it is one line that names the field instead of a stack trace."""
  parse = flag._parse

  def parse_or_flag_error(argument):
    try:
      return parse(argument)
    except AttributeError as error:  # Its text is the repr of ConfigDict's KeyError message.
      text = str(error.args[0]) if error.args else str(error)
      try:
        text = str(ast.literal_eval(text))
      except (SyntaxError, ValueError):
        pass
      raise flags.IllegalFlagValueError(
          f'--{flag.name}: unknown field {" ".join(text.split())}') from None

  flag._parse = parse_or_flag_error


def define_config_flag(name: str = 'config', help_string: str = 'Configuration file.',
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: list[str] | None = None) -> flags.FlagHolder:
  """Defines the required `--config` flag (locked: misspelt override fields are rejected).

  ml_collections finds the override fields in `sys_argv` (default: `sys.argv`)."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                           lock_config=True, sys_argv=sys_argv)
  flags.mark_flag_as_required(name, flag_values=flag_values)
  _report_unknown_fields_as_flag_errors(flag_values[name])
  flags.register_validator(name, lambda _: _check_none_only_for_placeholders(name, flag_values),
                           flag_values=flag_values)
  return holder


def define_step_flag(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """`--step`: which checkpoint of a workdir a script loads (`checkpoint.choose_step`)."""
  from jaxcap import checkpoint  # Only the scripts that load a checkpoint need it.

  def valid(value):
    try:
      checkpoint.parse_step(value)
    except ValueError:
      return False
    return True

  holder = flags.DEFINE_string(
      'step', None, "Checkpoint: 'best' (the best validation score, config.best_checkpoint), "
      "'latest' or a step number (default: the best where one is recorded, else the latest).",
      flag_values=flag_values)
  flags.register_validator('step', valid, "--step: give best, latest or a step number",
                           flag_values=flag_values)
  return holder
