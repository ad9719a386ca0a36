"""LICENSE and CITATION.cff: present, parseable, and naming what they should."""

import yaml

from tiny import ROOT

# Top-level keys that CFF 1.2.0's schema allows (it rejects any other).
CFF_KEYS = {
    "abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi", "identifiers", "keywords",
    "license", "license-url", "message", "preferred-citation", "references", "repository", "repository-artifact",
    "repository-code", "title", "type", "url", "version",
}  # fmt: skip


def test_license_is_mit_for_the_contributors():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the CCSI-CIL contributors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_citation_cff_parses_and_cites_the_software_and_the_ccsi_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert set(cff) <= CFF_KEYS
    assert {"cff-version", "message", "title", "authors"} <= set(cff)
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    [paper] = cff["references"]
    assert paper["type"] == "article" and paper["year"] == 2024
    assert "Continual Class-Specific Impression for Data-free Class Incremental Learning" in paper["title"]
    names = [f"{a['given-names']} {a['family-names']}" for a in paper["authors"]]
    assert names == ["Sana Ayromlou", "Teresa Tsang", "Purang Abolmaesumi", "Xiaoxiao Li"]
    assert paper["url"] == "https://arxiv.org/abs/2406.05631"
