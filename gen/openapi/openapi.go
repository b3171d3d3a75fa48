// Package openapi embeds the OpenAPI document generated from proto/, served
// at /api/openapi.json. This file is written by hand; `make generate`
// removes and rewrites only the generated files beside it.
package openapi

import _ "embed"

// JSON is the OpenAPI v2 document of the REST API.
//
//go:embed nixplane.swagger.json
var JSON []byte
