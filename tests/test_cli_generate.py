import json

from PIL import Image

from llcm.cli import main


def test_llcm_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "ever downloaded" in out


def test_generate_writes_pngs_with_metadata(tmp_path, capsys):
    out = tmp_path / "gen"
    rc = main(["generate", "axial brain MRI", "--model", "tiny-cpu", "--steps", "2", "--batch", "3",
               "--seed", "7", "--w", "6", "--out", str(out)])
    assert rc == 0
    pngs = sorted(out.glob("0*.png"))
    assert [p.name for p in pngs] == ["000_seed7.png", "001_seed8.png", "002_seed9.png"]
    info = Image.open(pngs[1]).text
    assert info["llcm:prompt"] == "axial brain MRI" and info["llcm:seed"] == "8" and info["llcm:steps"] == "2"
    assert len(info["llcm:model_hash"]) >= 8
    assert (out / "grid.png").exists()
    records = json.loads((out / "generation.json").read_text())
    assert [r["seed"] for r in records] == [7, 8, 9] and records[0]["timesteps"] == [999, 499]
    # rerunning the same command refuses to overwrite; nothing is lost
    before = pngs[0].read_bytes()
    assert main(["generate", "axial brain MRI", "--model", "tiny-cpu", "--out", str(out), "--seed", "7"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert pngs[0].read_bytes() == before


def test_generate_rejects_bad_input_with_one_line(tmp_path, capsys):
    for argv in (["generate", "x", "--model", "tiny-cpu", "--steps", "0"],
                 ["generate", "x", "--model", "tiny-cpu", "--height", "30"],
                 ["generate", "x", "--model", "no/such/folder"],
                 ["generate", "--model", "tiny-cpu"]):
        assert main(argv + ["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("llcm generate: error:"), err
