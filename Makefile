.PHONY: install test fast-test lint format bench demo

install:
	pip install -c constraints.txt -e ".[all]"

test:
	python -m pytest -q

fast-test:
	python -m pytest -q -m "not slow"

lint:
	ruff check .
	ruff format --check .
	mypy sb3_trpo_ext benchmarks

format:
	ruff format .
	ruff check --fix .

bench:
	python -m benchmarks.speed

demo:
	python -m sb3_trpo_ext
