// Validates KEDA objects in the given YAML files against KEDA's CRD schemas
// (@kubernetes-models/keda). Exit 0 when every KEDA object is valid, 1 otherwise.
"use strict";
const fs = require("fs");
const yaml = require("js-yaml");
const kinds = {
  ScaledObject: require("@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject").ScaledObject,
  ScaledJob: require("@kubernetes-models/keda/keda.sh/v1alpha1/ScaledJob").ScaledJob,
  TriggerAuthentication: require("@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication").TriggerAuthentication,
};
let failed = false;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc || doc.apiVersion !== "keda.sh/v1alpha1") continue;
    const Model = kinds[doc.kind];
    if (!Model) {
      console.error(`${file}: no schema for KEDA kind ${doc.kind}`);
      failed = true;
      continue;
    }
    try {
      new Model(doc).validate();
      checked++;
      console.log(`${file}: ${doc.kind} ${doc.metadata.name} is valid`);
    } catch (e) {
      console.error(`${file}: ${doc.kind}: ${e.message}`);
      failed = true;
    }
  }
}
if (checked === 0 && !failed) {
  console.error("no KEDA object found");
  failed = true;
}
process.exit(failed ? 1 : 0);
