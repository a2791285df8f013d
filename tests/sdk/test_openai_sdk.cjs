// The official `openai` Node SDK against a running acc gateway.
//
// Run by tests/sdk.rs (NODE_PATH from scripts/node-env.sh) with:
//   ACC_BASE_URL     http://127.0.0.1:PORT/v1 (proxy listener)
//   ACC_API_KEY      a client key the gateway's policy accepts
//   ACC_EDIT_IMAGE   a PNG file to send to the edit endpoint
//   ACC_UPSTREAM_B64 the image the mock upstream answers edits with, base64
// Exits non-zero (with the failed assertion) on the first failed check.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');

// Node.js 18 has no global File; the SDK's toFile() needs one.
if (typeof globalThis.File === 'undefined') {
  globalThis.File = require('node:buffer').File;
}

const { OpenAI, toFile, AuthenticationError, BadRequestError, ConflictError } = require('openai');

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

function pngDims(buf) {
  assert.ok(buf.subarray(0, 8).equals(PNG_SIGNATURE), `not a PNG: ${buf.subarray(0, 8).toString('hex')}`);
  assert.equal(buf.subarray(12, 16).toString('latin1'), 'IHDR');
  return [buf.readUInt32BE(16), buf.readUInt32BE(20)];
}

/// Runs `call`, which must reject with an instance of `cls`; returns the error.
async function rejects(what, cls, call) {
  try {
    await call();
  } catch (e) {
    assert.ok(e instanceof cls, `${what}: expected ${cls.name}, got ${e && e.constructor && e.constructor.name}: ${e}`);
    return e;
  }
  throw new assert.AssertionError({ message: `${what}: no ${cls.name} was raised` });
}

async function main() {
  const baseURL = process.env.ACC_BASE_URL;
  const apiKey = process.env.ACC_API_KEY;
  const version = JSON.parse(fs.readFileSync(require.resolve('openai').replace(/index\.js$/, 'package.json'), 'utf8')).version;
  console.log(`openai (node) ${version} on Node.js ${process.version} against ${baseURL}`);
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });

  // Generate: b64_json, n=2, and the gateway's headers through withResponse().
  const { data: gen, response, request_id } = await client.images
    .generate({ model: 'acc-demo', prompt: 'a watercolor fox', n: 2, size: '256x256', response_format: 'b64_json' })
    .withResponse();
  assert.equal(gen.data.length, 2);
  const images = gen.data.map((d) => Buffer.from(d.b64_json, 'base64'));
  for (const img of images) assert.deepEqual(pngDims(img), [256, 256]);
  assert.ok(!images[0].equals(images[1]), 'n=2 must give two different images');
  assert.ok(Number.isInteger(gen.created) && gen.created > 0, `created ${gen.created}`);
  assert.equal(response.headers.get('x-acc-route'), 'demo');
  assert.equal(response.headers.get('x-acc-provider'), 'demo');
  // The SDK's request id is the gateway's trace id.
  assert.equal(request_id, response.headers.get('x-acc-trace-id'));
  console.log('ok: generate');

  // Edit with a file: the upstream gets the file, the client the upstream's image.
  const file = await toFile(fs.readFileSync(process.env.ACC_EDIT_IMAGE), 'photo.png', { type: 'image/png' });
  const edit = await client.images.edit({
    model: 'ed',
    image: file,
    prompt: 'make the sky orange',
    response_format: 'b64_json',
  });
  assert.equal(edit.data.length, 1);
  assert.equal(edit.data[0].b64_json, process.env.ACC_UPSTREAM_B64, "the upstream's image, as b64_json");
  console.log('ok: edit with a file');

  // A refused request: the provider's content filter -> BadRequestError, OpenAI's code.
  const refused = await rejects('a refused prompt', BadRequestError, () =>
    client.images.generate({ model: 'refused', prompt: 'something the provider refuses', response_format: 'b64_json' }),
  );
  assert.equal(refused.status, 400);
  assert.equal(refused.code, 'content_policy_violation');
  assert.equal(refused.type, 'invalid_request_error');
  console.log('ok: refused -> BadRequestError content_policy_violation');

  // A wrong key -> AuthenticationError.
  const wrong = new OpenAI({ baseURL, apiKey: 'sk-definitely-wrong', maxRetries: 0, timeout: 60_000 });
  const unauth = await rejects('a wrong key', AuthenticationError, () =>
    wrong.images.generate({ model: 'acc-demo', prompt: 'x', size: '256x256' }),
  );
  assert.equal(unauth.status, 401);
  assert.equal(unauth.code, 'invalid_api_key');
  console.log('ok: wrong key -> AuthenticationError');

  // Idempotent replay: the same Idempotency-Key (request options' headers) twice gives the
  // same image, replayed, not generated again.
  const opts = { headers: { 'Idempotency-Key': 'node-idem-1' } };
  const body = { model: 'acc-demo', prompt: 'an idempotent fox', size: '256x256', response_format: 'b64_json' };
  const first = await client.images.generate(body, opts).withResponse();
  const again = await client.images.generate(body, opts).withResponse();
  assert.equal(first.response.headers.get('x-acc-idempotent-replay'), null);
  assert.equal(again.response.headers.get('x-acc-idempotent-replay'), 'true');
  assert.equal(again.response.headers.get('x-acc-trace-id'), first.response.headers.get('x-acc-trace-id'));
  assert.equal(again.data.data[0].b64_json, first.data.data[0].b64_json);
  // The same key with another body: ConflictError, which the SDK must not retry (its default
  // retries are on here: x-should-retry: false stops them).
  const retrying = new OpenAI({ baseURL, apiKey, maxRetries: 2, timeout: 60_000 });
  const conflict = await rejects('a reused Idempotency-Key', ConflictError, () =>
    retrying.images.generate({ ...body, prompt: 'another prompt' }, opts),
  );
  assert.equal(conflict.status, 409);
  assert.equal(conflict.code, 'idempotency_key_reused');
  assert.equal(conflict.headers.get('x-should-retry'), 'false');
  console.log('ok: Idempotency-Key replay and conflict');
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e && e.stack ? e.stack : e);
    process.exit(1);
  },
);
