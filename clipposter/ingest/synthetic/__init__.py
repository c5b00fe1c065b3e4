"""Genre-conditioned synthetic movie posters, so the whole pipeline runs offline.

`generate_posters` draws n posters with 1-3 genres each, writes them as JPEGs plus a manifest.csv,
and returns the records. `text` writes their titles, taglines and overviews from per-genre grammars,
`render` draws them, `generate` writes the files. Reruns with the same seed are byte-identical.
"""
from clipposter.ingest.synthetic.generate import JPEG_QUALITY, generate_posters
from clipposter.ingest.synthetic.render import CUES, cue_box, render_poster
from clipposter.ingest.synthetic.text import SYNTHETIC_GENRES, make_overview, make_tagline, make_title, sample_genres

__all__ = ["SYNTHETIC_GENRES", "CUES", "cue_box", "JPEG_QUALITY", "generate_posters", "render_poster", "make_title", "make_tagline",
           "make_overview", "sample_genres"]
