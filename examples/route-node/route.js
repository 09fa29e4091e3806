#!/usr/bin/env node
// Route one query with a ctxdraft policy.onnx from Node.js, without Python.
//
//   node route.js policy.onnx '[1, 2, 3]'          # token ids as a JSON array on argv
//   echo '[1, 2, 3]' | node route.js policy.onnx   # ... or on stdin
//
// Prints {"arm": NAME, "probs": {ARM: p, ...}} on stdout. The graph's `arm_names` output names the
// columns of `probs` (onnxruntime-node cannot read metadata_props). For a policy trained on hidden
// features, pass the feature vector (floats) instead of token ids.
'use strict';

const fs = require('fs');
const ort = require('onnxruntime-node');

async function readQuery(arg) {
  const text = arg !== undefined ? arg : fs.readFileSync(0, 'utf8');
  const values = JSON.parse(text);
  if (!Array.isArray(values) || !values.every((v) => typeof v === 'number' && Number.isFinite(v))) {
    throw new Error('the query must be a JSON array of numbers (token ids, or hidden features)');
  }
  return values;
}

async function route(modelPath, values) {
  const session = await ort.InferenceSession.create(modelPath);
  const inputName = session.inputNames[0];
  let input;
  if (inputName === 'token_ids') {
    if (!values.every((v) => Number.isInteger(v) && v >= 0)) {
      throw new Error('token ids must be non-negative integers');
    }
    // [1, T] int64; an empty prompt is one padding id (-1), which the graph masks out.
    const ids = values.length ? values : [-1];
    input = new ort.Tensor('int64', BigInt64Array.from(ids.map((v) => BigInt(v))), [1, ids.length]);
  } else if (inputName === 'features') {
    input = new ort.Tensor('float32', Float32Array.from(values), [1, values.length]);
  } else {
    throw new Error(`${modelPath} is not a ctxdraft policy (input ${inputName})`);
  }
  const out = await session.run({ [inputName]: input });
  const armNames = out.arm_names.data; // string[] [A]
  const probs = Array.from(out.probs.data); // float32 [1, A]
  let best = 0;
  for (let a = 1; a < probs.length; a++) if (probs[a] > probs[best]) best = a;
  return { arm: armNames[best], probs: Object.fromEntries(armNames.map((name, a) => [name, probs[a]])) };
}

async function main() {
  const [modelPath, query] = process.argv.slice(2);
  if (!modelPath) {
    console.error('usage: node route.js policy.onnx [JSON array of token ids]   (or the array on stdin)');
    process.exit(2);
  }
  const result = await route(modelPath, await readQuery(query));
  console.log(JSON.stringify(result));
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
