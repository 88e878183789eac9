"""Source of gateway/api/openapi.json (run: python tools/openapi_source.py > gateway/api/openapi.json).

The JSON file is what is served and tested; this script only keeps it readable to edit."""

import json

END_REASONS = ["rejected", "user_hangup", "business_hangup", "ring_timeout", "not_answered",
               "max_duration", "media_failure", "provider_error", "shutdown", "declined",
               "permission_denied", "permission_timeout", "bot_hangup", "bot_failure", "sip_hangup",
               "sip_failure", "gateway_restart", "instance_lost"]
PERMISSION_STATES = ["none", "requested", "granted", "rejected", "revoked", "expired"]
STATES = ["created", "offer_sent", "ringing", "accepted", "media_connected", "ended"]


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema):
    return {"anyOf": [schema, {"type": "null"}]}


def json_body(schema):
    return {"content": {"application/json": {"schema": schema}}}


def error(description):
    return {"description": description, **json_body(ref("Error"))}


ERRORS = {"400": error("Invalid request"), "401": error("Missing or wrong bearer token")}
IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
               "schema": {"type": "string", "minLength": 1, "maxLength": 255},
               "description": "A retry with the same key returns the same call or request (kept 24 h, "
                              "across restarts); the same key with another body is a 422"}
RETRIES = {"409": error("A request with this Idempotency-Key is still being processed"),
           "422": error("This Idempotency-Key was used with a different body")}

doc = {
    "openapi": "3.1.0",
    "info": {"title": "wacall control API", "version": "1",
             "description": "Place, watch and end WhatsApp Business calls. Authenticate with "
                            "'Authorization: Bearer <WACALL_API_TOKEN>'. Every error has the shape "
                            "{\"error\": {\"code\", \"message\", \"resolution\"?}}."},
    "servers": [{"url": "http://127.0.0.1:8080", "description": "wacall serve (WACALL_HOST, WACALL_PORT)"}],
    "security": [{"bearer": []}],
    "paths": {
        "/v1/calls": {
            "post": {
                "operationId": "createCall",
                "summary": "Place a business-initiated call",
                "parameters": [IDEMPOTENCY],
                "requestBody": {"required": True, **json_body(ref("CreateCall"))},
                "responses": {
                    "201": {"description": "The call was accepted by the provider and is ringing",
                            **json_body(ref("Call"))},
                    **ERRORS, **RETRIES,
                    "403": error("The provider refused: no permission (138006) or it expired (138010)"),
                    "429": error("A limit was hit (e.g. 138012 calls per 24 h)"),
                    "501": error("A requested feature is not available in this version"),
                    "502": error("The provider refused the call for another reason, or the bot is unreachable"),
                    "503": error("Over capacity or provider unreachable"),
                    "507": error("Recording asked for, but the data dir is below WACALL_MIN_FREE_MB "
                                 "(code insufficient_storage); a call without recording still goes through"),
                },
            },
            "get": {
                "operationId": "listCalls",
                "summary": "List calls, newest first",
                "parameters": [
                    {"name": "state", "in": "query", "schema": {"type": "string", "enum": STATES}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"},
                     "description": "next_cursor of the previous page"},
                    {"name": "user", "in": "query", "schema": {"type": "string"},
                     "description": "Only calls with this user (E.164)"},
                    {"name": "direction", "in": "query",
                     "schema": {"type": "string", "enum": ["BUSINESS_INITIATED", "USER_INITIATED"]}},
                    {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"},
                     "description": "Only calls created at or after this time (ISO 8601)"},
                    {"name": "until", "in": "query", "schema": {"type": "string", "format": "date-time"},
                     "description": "Only calls created before this time (ISO 8601)"},
                ],
                "responses": {"200": {"description": "A page of calls", **json_body(ref("CallList"))},
                              **ERRORS},
            },
        },
        "/v1/calls/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "wacall call id (call_…) or WhatsApp call id (wacid.…)"}],
            "get": {"operationId": "getCall", "summary": "A call's state, timeline and media statistics",
                    "responses": {"200": {"description": "The call", **json_body(ref("Call"))},
                                  "401": ERRORS["401"], "404": error("No such call")}},
            "delete": {"operationId": "hangUp", "summary": "Hang up (idempotent)",
                       "responses": {"200": {"description": "The ended call", **json_body(ref("Call"))},
                                     "401": ERRORS["401"], "404": error("No such call"),
                                     "502": {"description": "The call ended here, but the provider did not "
                                                            "confirm the hang-up (code hangup_unconfirmed); "
                                                            "it is tried again at the next start",
                                             **json_body({"type": "object", "required": ["error", "call"],
                                                          "properties": {"error": {"type": "object"},
                                                                         "call": ref("Call")}})}}},
        },
        "/v1/calls/{id}/play": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {"operationId": "play", "summary": "Queue files to play to the user",
                     "requestBody": {"required": True, **json_body(ref("Play"))},
                     "responses": {"202": {"description": "Queued", **json_body(ref("Queued"))},
                                   **ERRORS, "404": error("No such call"),
                                   "409": error("The call has ended")}},
        },
        "/v1/calls/{id}/dtmf": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {"operationId": "sendDtmf", "summary": "Send DTMF digits to the user (RFC 4733)",
                     "requestBody": {"required": True, **json_body(ref("Dtmf"))},
                     "responses": {"202": {"description": "Sent", **json_body(ref("DtmfSent"))},
                                   **ERRORS, "404": error("No such call"),
                                   "409": error("The call is not connected, or DTMF was not negotiated")}},
        },
        "/v1/recordings": {
            "get": {"operationId": "listRecordings", "summary": "Recorded calls, newest first",
                    "parameters": [
                        {"name": "call_id", "in": "query", "schema": {"type": "string"}},
                        {"name": "user", "in": "query", "schema": {"type": "string"},
                         "description": "E.164 number or BSUID"},
                        {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                        {"name": "until", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"},
                         "description": "next_cursor of the previous page"}],
                    "responses": {"200": {"description": "A page of recordings", **json_body(ref("RecordingList"))},
                                  **ERRORS}},
        },
        "/v1/calls/{id}/recordings": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "delete": {"operationId": "eraseRecordings", "summary": "Erase a call's recordings (the call stays)",
                       "responses": {"200": {"description": "Erased", **json_body(ref("Erased"))},
                                     **ERRORS, "404": error("No recordings for this call"),
                                     "409": error("The call is still being recorded")}},
        },
        "/v1/calls/{id}/recordings/{file}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "file", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "a name from the recording's files (stereo.wav, user.wav, user.ogg, "
                                           "recording.json, provider artifacts)"}],
            "get": {"operationId": "getRecordingFile",
                    "summary": "Download one file (Range requests: 206; ETag / If-None-Match: 304)",
                    "parameters": [{"name": "Range", "in": "header", "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "The file",
                                          "content": {"audio/wav": {}, "audio/ogg": {}, "application/json": {}}},
                                  "206": {"description": "The requested bytes"},
                                  "304": {"description": "Not modified"},
                                  "416": {"description": "The range is outside the file"},
                                  **ERRORS, "404": error("No such call or file")}},
        },
        "/v1/calls/{id}/waveform": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"operationId": "getWaveform", "summary": "Min/max peaks per column, per channel",
                    "parameters": [{"name": "file", "in": "query", "schema": {"type": "string", "default": "stereo.wav"}},
                                   {"name": "width", "in": "query",
                                    "schema": {"type": "integer", "minimum": 1, "maximum": 4000, "default": 800}}],
                    "responses": {"200": {"description": "Peaks", **json_body(ref("Waveform"))},
                                  **ERRORS, "404": error("No such call or file")}},
        },
        "/v1/permissions": {
            "get": {"operationId": "listPermissions", "summary": "Every user the ledger knows",
                    "responses": {"200": {"description": "Permission states",
                                          **json_body(ref("PermissionList"))}, "401": ERRORS["401"]}},
        },
        "/v1/permissions/{user}": {
            "parameters": [{"name": "user", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "E.164 number"}],
            "get": {"operationId": "getPermission", "summary": "What the rules allow for this user now",
                    "parameters": [{"name": "refresh", "in": "query", "schema": {"type": "string", "enum": ["1", "true"]},
                                    "description": "reconcile with the provider's permission-state endpoint first"}],
                    "responses": {"200": {"description": "Permission state", **json_body(ref("Permission"))},
                                  **ERRORS, "502": error("The provider refused the lookup"),
                                  "503": error("Provider unreachable")}},
        },
        "/v1/permissions/{user}/request": {
            "parameters": [{"name": "user", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {"operationId": "requestPermission", "summary": "Send a call-permission request",
                     "parameters": [IDEMPOTENCY],
                     "requestBody": {"required": False, **json_body(ref("PermissionRequest"))},
                     "responses": {"202": {"description": "Sent", **json_body(ref("PermissionRequested"))},
                                   **ERRORS, "422": RETRIES["422"],
                                   "409": error("A permanent permission exists (138017), or a request with "
                                                "this Idempotency-Key is still being processed"),
                                   "429": error("Too many requests (138011); retry_at says when"),
                                   "502": error("The provider refused the request"),
                                   "503": error("Provider unreachable")}},
        },
        "/v1/events": {
            "get": {"operationId": "events", "summary": "Server-Sent Events: every call state change",
                    "parameters": [
                        {"name": "call_id", "in": "query", "schema": {"type": "string"}},
                        {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "An event stream; each data line is an Event",
                                          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                                  "401": ERRORS["401"]}},
        },
        "/v1/openapi.json": {
            "get": {"operationId": "openapi", "summary": "This document", "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1 document",
                                          **json_body({"type": "object"})}}},
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object", "required": ["error"], "additionalProperties": False,
                "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {
                        "code": {"type": ["string", "integer"],
                                 "description": "A provider code (138006, …) or a wacall code (bad_request, …)"},
                        "message": {"type": "string"},
                        "resolution": {"type": "string"},
                        "details": {"type": "string"},
                        "call_id": {"type": "string"},
                        "retry_at": {"type": ["string", "null"]},
                    }}},
            },
            "ProviderError": {
                "type": "object", "required": ["code", "message", "resolution"],
                "properties": {"code": {"type": ["integer", "null"]}, "message": {"type": "string"},
                               "resolution": {"type": "string"}, "details": {"type": "string"}},
            },
            "CreateCall": {
                "type": "object", "anyOf": [{"required": ["to"]}, {"required": ["recipient"]}],
                "additionalProperties": False,
                "properties": {
                    "to": {"type": "string", "description": "E.164 number, e.g. +4915112345678, or a "
                           "business-scoped user id (BSUID, e.g. US.13491208655302741918; Meta backend)"},
                    "recipient": {"type": "string", "description": "A BSUID (CC.id or CC.ENT.id; Meta backend; "
                                  "`to` wins when both are given)"},
                    "play": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                             "description": "File(s) relative to WACALL_MEDIA_DIR, played once the user picks up"},
                    "record": {"type": "boolean", "default": False},
                    "biz_opaque_callback_data": {"type": "string", "maxLength": 512},
                    "ring_timeout_s": {"type": "number", "exclusiveMinimum": 0},
                    "max_duration_s": {"type": "number", "exclusiveMinimum": 0},
                    "bot": ref("Bot"),
                    "sip": ref("Sip"),
                    "provider_recording": {
                        "type": "object", "required": ["purpose"], "additionalProperties": False,
                        "description": "WhatsApp records (and transcribes) the call itself, announcing it to both "
                                       "parties; the artifacts arrive by webhook and are kept with the recordings "
                                       "(Meta backend)",
                        "properties": {"purpose": {"type": "string", "maxLength": 250},
                                       "announcement_language": {"type": "string", "enum": [
                                           "en", "en_US", "nl", "fr", "de", "hi", "it", "kn", "pt", "es", "es_ES",
                                           "te", "vi"], "default": "en_US"},
                                       "transcription": {"type": "boolean", "default": False}}},
                    "if_no_permission": {"type": "string", "enum": ["fail", "request"], "default": "fail",
                                         "description": "request: park the call, ask for permission, dial on GRANTED"},
                    "permission_request": ref("PermissionRequest"),
                    "permission_wait_s": {"type": "number", "exclusiveMinimum": 0},
                },
            },
            "Bot": {
                "type": "object", "required": ["url"],
                "description": "A voice bot takes the call once the user picked up",
                "properties": {
                    "protocol": {"type": "string", "enum": ["twilio", "pcm", "audiosocket"], "default": "twilio"},
                    "url": {"type": "string", "description": "ws:// or wss:// (twilio, pcm), tcp://host:port (audiosocket)"},
                    "parameters": {"type": "object", "additionalProperties": {"type": "string"},
                                   "description": "customParameters of the start message"},
                    "idle_timeout_s": {"type": ["number", "null"]},
                    "connect_timeout_s": {"type": "number"},
                    "sample_rate": {"type": "integer", "enum": [8000, 16000, 24000, 48000]},
                    "account_sid": {"type": "string"},
                },
            },
            "Sip": {
                "type": "object", "required": ["uri"], "additionalProperties": False,
                "description": "A SIP party (an IVR, a PBX queue) dialled once the user picked up and joined to "
                               "the call (needs WACALL_SIP_LISTEN); the INVITE carries X-Wacall-Call-Id and "
                               "X-WhatsApp-Call-Id. Either side hanging up ends both (end reasons sip_hangup, "
                               "sip_failure)",
                "properties": {
                    "uri": {"type": "string", "description": "sip: or sips: URI, e.g. sip:ivr@pbx.example:5060 "
                                                            "(;transport=tcp for TCP)"},
                    "username": {"type": "string", "description": "digest user for a 401/407 challenge"},
                    "password": {"type": "string"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 20,
                                "description": "extra INVITE headers (e.g. X-Campaign)"},
                    "codecs": {"type": "array", "items": {"type": "string", "enum": ["opus", "G722", "PCMU", "PCMA"]},
                               "description": "offer order (default opus, G722, PCMU, PCMA)"},
                    "answer_timeout_s": {"type": "number", "minimum": 1, "maximum": 600, "default": 30},
                    "probe": {"type": "boolean", "default": True,
                              "description": "OPTIONS first: no answer means no call (502 sip_unavailable)"},
                },
            },
            "Dtmf": {"type": "object", "required": ["digits"],
                     "properties": {"digits": {"type": "string", "pattern": "^[0-9*#A-Da-d]+$"},
                                    "duration_ms": {"type": "integer", "minimum": 40, "maximum": 2000}}},
            "RecordingFile": {"type": "object", "required": ["name", "kind", "format", "content_type", "size", "url"],
                              "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                             "format": {"type": "string"}, "content_type": {"type": "string"},
                                             "size": {"type": "integer"}, "duration_s": nullable({"type": "number"}),
                                             "url": {"type": "string"}}},
            "Recording": {"type": "object", "required": ["call_id", "started_at", "complete", "files"],
                          "properties": {"call_id": {"type": "string"}, "direction": nullable({"type": "string"}),
                                         "wacid": nullable({"type": "string"}), "user": nullable({"type": "string"}),
                                         "started_at": nullable({"type": "string"}),
                                         "ended_at": nullable({"type": "string"}),
                                         "duration_s": nullable({"type": "number"}), "complete": {"type": "boolean"},
                                         "recovered": {"type": "boolean"}, "error": nullable({"type": "object"}),
                                         "files": {"type": "array", "items": ref("RecordingFile")}}},
            "RecordingList": {"type": "object", "required": ["recordings", "next_cursor"],
                              "properties": {"recordings": {"type": "array", "items": ref("Recording")},
                                             "next_cursor": nullable({"type": "string"})}},
            "Erased": {"type": "object", "required": ["call_id", "erased"],
                       "properties": {"call_id": {"type": "string"}, "erased": {"type": "boolean"}}},
            "Waveform": {"type": "object", "required": ["file", "width", "channels", "sample_rate", "duration_s", "peaks"],
                         "properties": {"file": {"type": "string"}, "width": {"type": "integer"},
                                        "channels": {"type": "integer"}, "sample_rate": {"type": "integer"},
                                        "duration_s": {"type": "number"},
                                        "peaks": {"type": "array", "description": "per channel: [min, max] per column",
                                                  "items": {"type": "array", "items": {
                                                      "type": "array", "items": {"type": "number"}}}}}},
            "DtmfSent": {"type": "object", "required": ["id", "sent", "state"],
                         "properties": {"id": {"type": "string"}, "sent": {"type": "string"},
                                        "state": {"type": "string"}}},
            "PermissionRequest": {
                "type": "object",
                "properties": {
                    "via": {"type": "string", "enum": ["interactive", "template"], "default": "interactive"},
                    "text": {"type": "string", "description": "Body of the interactive request"},
                    "template": {"type": "object", "required": ["name"],
                                 "properties": {"name": {"type": "string"}, "language": {"type": "string"},
                                                "parameters": {"oneOf": [
                                                    {"type": "array", "items": {"type": "string"}},
                                                    {"type": "object"}]}}},
                },
            },
            "Permission": {
                "type": "object",
                "required": ["user", "status", "permanent", "expires_at", "requests_last_7d", "calls_last_24h",
                             "unanswered_in_a_row", "next_request_allowed_at", "next_call_allowed_at"],
                "properties": {
                    "user": {"type": "string"},
                    "status": {"type": "string", "enum": PERMISSION_STATES},
                    "permanent": {"type": "boolean"},
                    "expires_at": nullable({"type": "string", "format": "date-time"}),
                    "requests_last_7d": {"type": "integer"},
                    "calls_last_24h": {"type": "integer"},
                    "unanswered_in_a_row": {"type": "integer"},
                    "next_request_allowed_at": nullable({"type": "string", "format": "date-time"}),
                    "next_call_allowed_at": nullable({"type": "string", "format": "date-time"}),
                },
            },
            "PermissionRequested": {"allOf": [ref("Permission"), {
                "type": "object", "required": ["message_id", "via"],
                "properties": {"message_id": {"type": "string"}, "via": {"type": "string"}}}]},
            "PermissionList": {"type": "object", "required": ["permissions"],
                               "properties": {"permissions": {"type": "array", "items": ref("Permission")}}},
            "Play": {"type": "object", "required": ["play"],
                     "properties": {"play": {"oneOf": [{"type": "string"},
                                                       {"type": "array", "items": {"type": "string"}}]}}},
            "Queued": {"type": "object", "required": ["id", "queued", "state"],
                       "properties": {"id": {"type": "string"}, "queued": {"type": "integer"},
                                      "state": {"type": "string", "enum": STATES}}},
            "TimelineEntry": {
                "type": "object", "required": ["name", "at", "elapsed_s"],
                "properties": {"name": {"type": "string"}, "at": {"type": "string", "format": "date-time"},
                               "elapsed_s": {"type": "number"}},
            },
            "Call": {
                "type": "object",
                "required": ["id", "wacid", "created_at", "direction", "user", "state", "end_reason",
                             "error", "timeline", "recordings", "media"],
                "properties": {
                    "id": {"type": "string"},
                    "wacid": nullable({"type": "string"}),
                    "created_at": {"type": "string", "format": "date-time"},
                    "biz_opaque_callback_data": nullable({"type": "string"}),
                    "direction": {"type": "string", "enum": ["BUSINESS_INITIATED", "USER_INITIATED"]},
                    "user": {"type": "string", "description": "The user's number, masked"},
                    "state": {"type": "string", "enum": STATES},
                    "end_reason": nullable({"type": "string", "enum": END_REASONS}),
                    "error": nullable(ref("ProviderError")),
                    "detail": nullable({"type": "string"}),
                    "connected_seconds": nullable({"type": "number"}),
                    "provider_duration_s": nullable({"type": "integer"}),
                    "timeline": {"type": "array", "items": ref("TimelineEntry")},
                    "recordings": {"type": "array", "items": {"type": "string"}},
                    "dtmf_received": {"type": "string", "description": "Digits the user pressed, in order"},
                    "recording": nullable({
                        "type": "object", "required": ["files", "error"],
                        "description": "The QA recording (null when the call is not recorded)",
                        "properties": {
                            "files": {"type": "object", "additionalProperties": {"type": "string"},
                                      "description": "user_wav, stereo_wav, user_ogg, sidecar"},
                            "error": nullable({
                                "type": "object", "required": ["code", "reason"],
                                "description": "Why the recording stopped early; the call went on",
                                "properties": {"code": {"type": "string",
                                                        "enum": ["disk_full", "io_error", "sink_error",
                                                                 "low_disk"]},
                                               "reason": {"type": "string"}}}),
                        }}),
                    "media": {"type": "object"},
                    "provider_hangup": {
                        "type": "object", "required": ["action", "confirmed", "attempts"],
                        "description": "What the provider said to wacall's hang-up (terminate or reject)",
                        "properties": {"action": {"type": "string", "enum": ["terminate", "reject"]},
                                       "confirmed": {"type": "boolean"}, "attempts": {"type": "integer"},
                                       "gone": {"type": "boolean"}, "error": nullable({"type": "object"})}},
                    "sip": {
                        "type": "object", "required": ["target", "codec", "media"],
                        "description": "The SIP party joined to the call (an IVR, a PBX): where (no user part), "
                                       "the codec, its RTP statistics (packets, loss, jitter, DTMF)",
                        "properties": {"target": {"type": "string"}, "codec": nullable({"type": "string"}),
                                       "media": {"type": "object"}}},
                    "provider_recording": {
                        "type": "object", "description": "WhatsApp's own recording asked for, and its artifacts "
                        "once delivered (kind -> file name, listed by the recordings API)",
                        "properties": {"purpose": {"type": "string"}, "announcement_language": {"type": "string"},
                                       "transcription": {"type": "boolean"},
                                       "artifacts": {"type": "object", "additionalProperties": {"type": "string"}}}},
                },
            },
            "CallList": {"type": "object", "required": ["calls", "next_cursor"],
                         "properties": {"calls": {"type": "array", "items": ref("Call")},
                                        "next_cursor": nullable({"type": "string"})}},
            "Event": {
                "type": "object", "required": ["id", "type", "created_at", "call_id", "data"],
                "properties": {"id": {"type": "string"}, "type": {"type": "string"},
                               "created_at": {"type": "string"}, "call_id": nullable({"type": "string"}),
                               "data": {"type": "object"}},
            },
        },
    },
}

if __name__ == "__main__":
    print(json.dumps(doc, indent=2))
