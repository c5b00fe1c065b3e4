# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment in .venv first (once; again when setup.cfg changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip prints a warning per empty local index folder; hide those lines, keep its exit code.
QUIET := { grep -v "is ignored" || true; }
# torch and torchvision are pinned as a pair: open_clip needs torchvision, and mismatched pairs fail to import.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup browser demo app test bench bench-app mutation clean

setup: $(VENV)/.installed browser

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC) 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q -e '.[test,metrics,scale,app]' 2>&1 | $(QUIET)
	$(BIN)/python -c "import clipposter, torch, torchvision, open_clip"
	touch $@

# The app's browser test drives Debian's Chromium (never a browser download). Installed here once,
# as root with apt; elsewhere install the `chromium` package yourself or the browser test is skipped.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the app's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "warning: $(CHROMIUM) missing and apt-get unavailable: the browser test will be skipped"; fi

demo: $(VENV)/.installed
	$(BIN)/clipposter demo --out runs/demo

# The web app over the demo's run folder, on http://127.0.0.1:7860.
app: demo
	$(BIN)/clipposter app --run runs/demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python scripts/bench/embed.py

bench-app: setup
	$(BIN)/python scripts/bench/app_load.py

# Mutation testing of the modules named in setup.cfg's [mutmut] (slow: see docs/testing.md).
# One worker by default; MUTATION_CHILDREN=4 on a machine of your own.
MUTATION_CHILDREN ?= 1
# The functions whose silent errors users would see (about 650 mutants, ~30 min on one worker):
# genre predictions and thresholds, the genre metrics and calibration, caption text clean-up and the
# LSTM token filter, the cache's append and repair, and the cell parsers of the sources.
# MUTANTS='clipposter.heads.genre.metrics.*' (a glob per module) widens it to whole files.
MUTANTS ?= 'clipposter.heads.genre.head.xǁGenreHeadǁpredict__mutmut_*' 'clipposter.heads.genre.head.xǁGenreHeadǁthresholds_for*' \
	'clipposter.heads.genre.head.xǁGenreHeadǁdescribe_predictions*' \
	'clipposter.heads.genre.metrics.x_genre_predictions*' 'clipposter.heads.genre.metrics.x_genre_prf*' 'clipposter.heads.genre.metrics.x_genre_average_precision*' \
	'clipposter.heads.genre.metrics.x__best_f1_threshold*' 'clipposter.heads.genre.metrics.x_genre_calibrate_thresholds*' \
	'clipposter.heads.caption.decoding.x_postprocess*' 'clipposter.heads.caption.decoding.xǁWordScheduledTopNǁ__call__*' \
	'clipposter.embedding.cache_matrix.xǁMatrixǁcheck*' 'clipposter.embedding.cache_matrix.xǁMatrixǁrepair*' \
	'clipposter.embedding.cache_matrix.xǁMatrixǁappend*' 'clipposter.embedding.cache_matrix.xǁMatrixǁset_header*' \
	'clipposter.embedding.cache_v1.xǁV1Cacheǁ_commit*' 'clipposter.embedding.cache_v1.xǁV1Cacheǁadd_posters*' \
	'clipposter.embedding.cache_types.x_cached_text_embeddings*' \
	'clipposter.ingest.sources.x__is_missing*' 'clipposter.ingest.sources.x__text*' 'clipposter.ingest.sources.x__id_text*' \
	'clipposter.ingest.sources.x__genres*' 'clipposter.ingest.sources.x__stem_of*' 'clipposter.ingest.sources.x__is_url*' \
	'clipposter.ingest.sources.x__find_column*' 'clipposter.ingest.sources.x_normalise_split*' 'clipposter.ingest.sources.x_imdb_id*' \
	'clipposter.ingest.sources.x__metadata_genres*'
mutation: setup
	$(BIN)/python -m pip install -q -e '.[mutation]' 2>&1 | $(QUIET)
	HYPOTHESIS_PROFILE=mutation $(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS)
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) runs .pytest_cache
