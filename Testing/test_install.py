from AbdomenSegLib import install


def test_requirements_never_list_what_slicer_ships():
    names = {n.lower() for n in install.requirement_names()}
    assert names and not names & {n.lower() for n in install.SLICER_BUNDLED}


def test_missing_packages_reports_torch_first():
    present = {"monai"}
    missing = install.missing_packages(find_spec=lambda name: name in present)
    assert missing[0] == "torch" and "monai" not in missing and "segmentation-models-pytorch" in missing
    assert install.missing_packages() == []  # this test environment has everything


def test_constraints_pin_installed_bundled_packages():
    import numpy
    text = open(install.constraints_file()).read()
    assert f"numpy=={numpy.__version__}" in text and "torch==" in text
