// Validate Kubernetes objects against the official OpenAPI JSON schemas bundled in the npm
// package kubernetes-models (offline). Usage: node k8s_validate.cjs MODELS_DIR < objects.json
// Prints one line per object; exits 1 if any is invalid or of an unknown kind.
"use strict";
const path = require("path");
const fs = require("fs");

const modelsDir = process.argv[2];
const docs = JSON.parse(fs.readFileSync(0, "utf8"));
let bad = 0;
for (const doc of docs) {
  const group = doc.apiVersion; // "v1" or "apps/v1": the folder layout of kubernetes-models
  const file = path.join(modelsDir, group, `${doc.kind}.js`);
  const name = `${doc.apiVersion} ${doc.kind} ${(doc.metadata || {}).name}`;
  if (!fs.existsSync(file)) {
    console.log(`UNKNOWN ${name}: no schema at ${file}`);
    bad += 1;
    continue;
  }
  const Model = require(file)[doc.kind];
  try {
    new Model(doc).validate();
    console.log(`ok ${name}`);
  } catch (err) {
    console.log(`INVALID ${name}: ${err.message}`);
    bad += 1;
  }
}
process.exit(bad ? 1 : 0);
