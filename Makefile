# The vocabulary of the project. Tool versions are pinned: buf and the
# TypeScript toolchain in webui/package-lock.json, the protoc plugins as
# go.mod tool entries.
SHELL := /bin/bash
GO ?= go
BUF := webui/node_modules/.bin/buf
VERSION ?= 0.1.0
COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS := -X github.com/nixplane/nixplane/cmd/internal/buildinfo.Version=$(VERSION) -X github.com/nixplane/nixplane/cmd/internal/buildinfo.Commit=$(COMMIT)

.PHONY: all build run demo test test-go test-web generate check-generated lint fuzz bench tools clean vendor-hash

all: build

webui/node_modules: webui/package.json webui/package-lock.json
	cd webui && npm ci --no-audit --no-fund
	touch webui/node_modules

tools: webui/node_modules

## build: the binaries into bin/
build:
	CGO_ENABLED=1 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

## demo: a server plus a simulated fleet (the first thing to run)
demo:
	$(GO) run ./cmd/nixplane demo

## run: the server on 127.0.0.1:8080 with ./data
run:
	$(GO) run ./cmd/nixplane serve --listen 127.0.0.1:8080 --data-dir ./data

## test: every test — Go (race detector on) and the web UI's unit tests
test: test-web test-go

test-go:
	$(GO) test -race -count=1 -timeout 30m ./...

test-web: webui/node_modules
	cd webui && npm test

## generate: Go, gateway, OpenAPI and TS from proto/, then the web bundle
generate: webui/node_modules
	rm -rf gen/nixplane gen/openapi/*.swagger.json webui/src/gen
	$(BUF) generate
	cd webui && npm run build

## check-generated: regenerate and fail on any difference, new files included
check-generated: generate
	git add -N gen webui/src/gen webui/dist
	git diff --exit-code -- gen webui/src/gen webui/dist || { echo "generated files are stale: run 'make generate' and commit"; exit 1; }

## lint: gofmt, go vet, buf lint and format, TypeScript type check
lint: webui/node_modules
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '^gen/')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(BUF) lint
	$(BUF) format --diff --exit-code --path proto/nixplane
	cd webui && npm run typecheck

## breaking: buf breaking against the previous commit of main
breaking: webui/node_modules
	@if git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:proto/nixplane 2>/dev/null; then \
		$(BUF) breaking --against '.git#ref=HEAD~1'; else echo "no earlier proto to compare"; fi

## fuzz: each fuzz target briefly (seeds are committed under testdata/fuzz).
## The budget is a count of executions: a duration budget can fail at its
## deadline with "context deadline exceeded" and no failing input (a race in
## Go's fuzzing coordinator before Go 1.27, golang/go#75804).
fuzz:
	@for dir in $$(grep -rl --include='*_test.go' '^func Fuzz' controlplane agent cmd 2>/dev/null | xargs -r -n1 dirname | sort -u); do \
		for f in $$(grep -h '^func Fuzz' $$dir/*_test.go | sed 's/func \(Fuzz[A-Za-z0-9_]*\).*/\1/'); do \
			echo "fuzz ./$$dir $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $${FUZZTIME:-50000x} ./$$dir || exit 1; \
		done; done

## bench: the hot-path benchmarks (BENCH=regexp to pick; see docs/PERFORMANCE.md for the load generator)
bench:
	$(GO) test -run '^$$' -bench '$(or $(BENCH),.)' -benchmem -timeout 30m ./controlplane/... ./agent/...

clean:
	rm -rf bin

## vendor-hash: refresh nix/vendor-hash.txt after go.mod or go.sum change (needs nix)
vendor-hash:
	@tmp=$$(mktemp -d) && $(GO) mod vendor -o $$tmp/vendor && \
		nix --extra-experimental-features nix-command hash path $$tmp/vendor > nix/vendor-hash.txt && \
		rm -rf $$tmp && cat nix/vendor-hash.txt
