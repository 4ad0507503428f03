"""The operator-editable data files: validation errors name file and key, DATA_DIR, reloads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from bridge import prompt_data
from bridge.prompt_data import PACKAGED_DATA_DIR, DataFileError, get_data, load_data
from bridge.safety import check_prompt
from bridge.settings import Settings


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """An editable copy of the packaged data files."""
    target = tmp_path / "data"
    shutil.copytree(PACKAGED_DATA_DIR, target)
    return target


def _edit(path: Path, change) -> None:
    content = yaml.safe_load(path.read_text())
    change(content)
    path.write_text(yaml.safe_dump(content, allow_unicode=True))


def test_packaged_files_load_with_every_template() -> None:
    data = load_data(PACKAGED_DATA_DIR)
    for name in ("chat", "unrestricted", "roleplay", "sdxl_enhance", "wan_enhance", "admin", "scene_detect"):
        template = data.template(name)
        assert template.system and template.max_tokens < template.context_tokens
    assert data.template("sdxl_enhance").prompt_budget == 75
    assert data.template("wan_enhance").prompt_budget == 100
    assert data.template("sdxl_enhance").quality_tags[:2] == ["score_9", "score_8_up"]


def test_settings_data_dir_defaults_to_packaged_folder() -> None:
    assert Settings().data_dir.resolve() == PACKAGED_DATA_DIR.resolve()
    assert Settings(data_dir="/somewhere/else").data_dir == Path("/somewhere/else")


def test_bad_value_names_file_and_key(data_dir: Path) -> None:
    _edit(data_dir / "templates.yaml", lambda d: d["templates"]["chat"].update(max_tokens=-5))
    with pytest.raises(DataFileError) as info:
        load_data(data_dir)
    message = str(info.value)
    assert "templates.yaml" in message and "templates.chat.max_tokens" in message


def test_unknown_key_is_reported_not_ignored(data_dir: Path) -> None:
    _edit(data_dir / "content_mode.yaml", lambda d: d.update(keywrods=["typo"]))
    with pytest.raises(DataFileError, match=r"content_mode\.yaml: keywrods"):
        load_data(data_dir)


def test_missing_template_is_named(data_dir: Path) -> None:
    _edit(data_dir / "templates.yaml", lambda d: d["templates"].pop("wan_enhance"))
    with pytest.raises(DataFileError, match="wan_enhance"):
        load_data(data_dir)


def test_invalid_yaml_names_line(data_dir: Path) -> None:
    (data_dir / "scene_rules.yaml").write_text("action_verbs: [walk\nmin_signals: 2\n")
    with pytest.raises(DataFileError, match=r"scene_rules\.yaml: not valid YAML \(line \d+"):
        load_data(data_dir)


def test_bad_regex_in_safety_terms_is_named(data_dir: Path) -> None:
    _edit(data_dir / "safety_terms.yaml", lambda d: d["age_patterns"].append("{AGE} (unclosed"))
    with pytest.raises(DataFileError, match=r"safety_terms\.yaml: age_patterns"):
        load_data(data_dir)


def test_missing_file_falls_back_to_packaged_copy(data_dir: Path) -> None:
    (data_dir / "scene_rules.yaml").unlink()
    _edit(data_dir / "templates.yaml", lambda d: d["templates"]["chat"].update(system="Operator's own prompt."))
    data = load_data(data_dir)
    assert data.template("chat").system == "Operator's own prompt."
    assert data.scene_rules == load_data(PACKAGED_DATA_DIR).scene_rules


def test_operator_safety_copy_extends_but_never_shrinks_the_gate(data_dir: Path) -> None:
    def extend(d: dict) -> None:
        d["minor_terms"] = ["operatorword"]
        d["sexual_terms"] = ["operatorlewd"]

    _edit(data_dir / "safety_terms.yaml", extend)
    data = load_data(data_dir)
    assert not check_prompt("nude child", data=data).allowed  # the built-in vocabulary stays
    assert not check_prompt("nude operatorword", data=data).allowed
    assert not check_prompt("operatorlewd kid", data=data).allowed


def test_allowed_phrases_in_a_data_file_are_refused(data_dir: Path) -> None:
    _edit(data_dir / "safety_terms.yaml", lambda d: d.update(allowed_phrases=["minor detail"]))
    with pytest.raises(DataFileError, match="allowed_phrases.*never exempt"):
        load_data(data_dir)


@pytest.mark.parametrize("entry, match", [
    ({"homoglyphs": {"i": "x"}}, "homoglyphs.*remap"),  # a Latin letter mapped away
    ({"homoglyphs": {"\u0456": "x"}}, "homoglyphs.*remap"),  # Cyrillic i is an i, not an x
    ({"leetspeak": {"k": "x"}}, "leetspeak.*remap"),
    ({"separators": "id"}, "separators.*letter"),  # letters deleted from every prompt
    ({"number_words": {"fourteen": 40}}, "number_words.*never change"),
])
def test_a_data_file_that_weakens_the_gate_is_refused(data_dir: Path, entry: dict, match: str) -> None:
    _edit(data_dir / "safety_terms.yaml", lambda d: d.update(entry))
    with pytest.raises(DataFileError, match=match):
        load_data(data_dir)


def test_a_data_file_may_add_a_look_alike_unicode_agrees_with(data_dir: Path) -> None:
    _edit(data_dir / "safety_terms.yaml", lambda d: d.update(homoglyphs={"\u0456": "i"}, leetspeak={"%": "x"}))
    assert load_data(data_dir).safety.homoglyphs == {"\u0456": "i"}


def test_data_dir_environment_variable(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _edit(data_dir / "templates.yaml", lambda d: d["templates"]["admin"].update(system="From DATA_DIR."))
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    assert get_data().template("admin").system == "From DATA_DIR."
    monkeypatch.delenv("DATA_DIR")
    assert get_data().template("admin").system != "From DATA_DIR."


def test_get_data_reloads_edits_and_keeps_last_good_copy(data_dir: Path) -> None:
    first = get_data(data_dir)
    assert get_data(data_dir) is first  # cached
    path = data_dir / "templates.yaml"
    _edit(path, lambda d: d["templates"]["chat"].update(temperature=0.25))
    os.utime(path, ns=(1, 2_000_000_000_000_000_000))
    edited = get_data(data_dir)
    assert edited.template("chat").temperature == 0.25
    path.write_text("templates: [broken")
    os.utime(path, ns=(1, 3_000_000_000_000_000_000))
    assert get_data(data_dir) is edited  # bad edit: logged, last good copy kept


def test_get_data_without_good_copy_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "content_mode.yaml").write_text("- not a mapping\n")
    with pytest.raises(DataFileError, match="content_mode.yaml: must be a YAML mapping"):
        get_data(bad)
    assert bad.resolve() not in prompt_data._cache
