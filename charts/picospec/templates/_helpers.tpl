{{/* ---------------------------------------------------------------- names */}}
{{- define "picospec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "picospec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's object name: <fullname>-<component>. Call with (list $ "verifier"). */}}
{{- define "picospec.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "picospec.fullname" $root | trunc 45 | trimSuffix "-") (index . 1) }}
{{- end }}

{{- define "picospec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "picospec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "picospec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- labels */}}
{{- define "picospec.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "picospec.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Standard labels. Call with (list $ "component"). */}}
{{- define "picospec.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "picospec.chart" $root }}
{{ include "picospec.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: picospec
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- capabilities */}}
{{/* "true" when the cluster serves an API version (or values.apiVersions lists it). */}}
{{- define "picospec.hasApi" -}}
{{- $root := index . 0 }}
{{- $api := index . 1 }}
{{- if or ($root.Capabilities.APIVersions.Has $api) (has $api $root.Values.apiVersions) }}true{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------- images */}}
{{- define "picospec.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "picospec.verifierImage" -}}
{{- $v := .Values.verifier.image }}
{{- $repo := default .Values.image.repository $v.repository }}
{{- $suffix := ternary $v.vllmTagSuffix $v.tagSuffix (eq .Values.verifier.backend "vllm") }}
{{- $tag := $v.tag | default (printf "%s%s" (default .Chart.AppVersion .Values.image.tag) $suffix) }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* The verifier's vLLM settings (verifier.vllm) as PICOSPEC_* variables. */}}
{{- define "picospec.vllmEnv" -}}
- name: PICOSPEC_VERIFIER_BACKEND
  value: vllm
- name: PICOSPEC_VLLM_TENSOR_PARALLEL_SIZE
  value: {{ .tensorParallelSize | quote }}
- name: PICOSPEC_VLLM_PIPELINE_PARALLEL_SIZE
  value: {{ .pipelineParallelSize | quote }}
- name: PICOSPEC_VLLM_DTYPE
  value: {{ .dtype | quote }}
{{- with .quantization }}
- name: PICOSPEC_VLLM_QUANTIZATION
  value: {{ . | quote }}
{{- end }}
{{- if gt (int .maxModelLen) 0 }}
- name: PICOSPEC_VLLM_MAX_MODEL_LEN
  value: {{ .maxModelLen | quote }}
{{- end }}
- name: PICOSPEC_VLLM_GPU_MEMORY_UTILIZATION
  value: {{ .gpuMemoryUtilization | quote }}
- name: PICOSPEC_VLLM_ENABLE_PREFIX_CACHING
  value: {{ .enablePrefixCaching | quote }}
- name: PICOSPEC_VLLM_MAX_LOGPROBS
  value: {{ .maxLogprobs | quote }}
- name: PICOSPEC_VLLM_ENFORCE_EAGER
  value: {{ .enforceEager | quote }}
{{- end }}

{{/* ---------------------------------------------------------------- NATS */}}
{{- define "picospec.natsMode" -}}
{{- if .Values.externalNats.url }}external{{ else if .Values.nats.enabled }}subchart{{ else }}builtin{{ end }}
{{- end }}

{{- define "picospec.natsAuthSecret" -}}
{{- default (printf "%s-nats-auth" (include "picospec.fullname" .)) .Values.natsAuth.existingSecret }}
{{- end }}

{{/* The official chart's object name (its fullname logic, with its defaults). */}}
{{- define "picospec.natsSubchartName" -}}
{{- $sub := .Values.nats }}
{{- if $sub.fullnameOverride }}
{{- $sub.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "nats" $sub.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Client URL of the cloud NATS, for pods on cloud nodes. */}}
{{- define "picospec.natsCloudUrl" -}}
{{- $mode := include "picospec.natsMode" . }}
{{- if eq $mode "external" }}
{{- .Values.externalNats.url }}
{{- else if eq $mode "subchart" }}
{{- printf "nats://%s.%s.svc:4222" (include "picospec.natsSubchartName" .) .Release.Namespace }}
{{- else }}
{{- printf "nats://%s.%s.svc:%d" (include "picospec.componentName" (list . "nats")) .Release.Namespace (int .Values.cloudNats.ports.client) }}
{{- end }}
{{- end }}

{{/* Client URL for pods on edge nodes: the node's leaf node, or the cloud NATS without one. */}}
{{- define "picospec.natsEdgeUrl" -}}
{{- if .Values.leafNode.enabled }}
{{- if eq .Values.edge.network "hostNetwork" }}
{{- printf "nats://127.0.0.1:%d" (int .Values.leafNode.ports.client) }}
{{- else }}
{{- printf "nats://$(HOST_IP):%d" (int .Values.leafNode.ports.client) }}
{{- end }}
{{- else }}
{{- include "picospec.natsCloudUrl" . }}
{{- end }}
{{- end }}

{{/* The hub URLs edge leaf nodes dial (without credentials), as a list. */}}
{{- define "picospec.leafHubUrls" -}}
{{- $urls := list }}
{{- if .Values.leafNode.hubUrls }}
{{- $urls = .Values.leafNode.hubUrls }}
{{- else if eq (include "picospec.natsMode" .) "external" }}
{{- $urls = .Values.externalNats.leafUrls }}
{{- else if eq (include "picospec.natsMode" .) "subchart" }}
{{- $urls = list (printf "nats-leaf://%s.%s.svc.cluster.local:7422" (include "picospec.natsSubchartName" .) .Release.Namespace) }}
{{- else }}
{{- $urls = list (printf "nats-leaf://%s.%s.svc.cluster.local:%d" (include "picospec.componentName" (list . "nats-leafnodes")) .Release.Namespace (int .Values.cloudNats.ports.leafnodes)) }}
{{- end }}
{{- toJson $urls }}
{{- end }}

{{/* Does any edge pod sit on the pod network (so the leaf node must listen beyond loopback)? */}}
{{- define "picospec.edgeListenHost" -}}
{{- if eq .Values.edge.network "hostNetwork" }}127.0.0.1{{ else }}0.0.0.0{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------- sites */}}
{{/* The edge sites as a JSON list of {name, suffix, var, nodeSelector, authSecret, tlsSecret}.
Without `sites`: one unnamed site made of every edge node (name "", each node its own site
label), with the release's shared NATS Secret: the single-site layout. */}}
{{- define "picospec.sites" -}}
{{- $out := list }}
{{- $full := include "picospec.fullname" . | trunc 40 | trimSuffix "-" }}
{{- if .Values.sites }}
{{- range $s := .Values.sites }}
{{- $sel := $s.nodeSelector | default (dict $.Values.edge.siteLabel $s.name) }}
{{- $out = append $out (dict "name" $s.name "suffix" (printf "-%s" $s.name) "var" (printf "_%s" (upper (replace "-" "_" $s.name))) "nodeSelector" $sel "authSecret" ($s.existingSecret | default (printf "%s-nats-auth-%s" $full $s.name)) "generate" (not $s.existingSecret) "tlsSecret" ($s.tlsSecret | default (printf "%s-leaf-tls-%s" $full $s.name))) }}
{{- end }}
{{- else }}
{{- $out = append $out (dict "name" "" "suffix" "" "var" "" "nodeSelector" (dict) "authSecret" (include "picospec.natsAuthSecret" .) "generate" false "tlsSecret" (.Values.tls.leaf.secretName | default (printf "%s-leaf-tls" $full))) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* A per-site object's name: (list $ "component" site). The component's name without a site. */}}
{{- define "picospec.siteComponentName" -}}
{{- $root := index . 0 }}
{{- $site := index . 2 }}
{{- if $site.name }}
{{- printf "%s-%s-%s" (include "picospec.fullname" $root | trunc 36 | trimSuffix "-") (index . 1) $site.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- include "picospec.componentName" (list $root (index . 1)) }}
{{- end }}
{{- end }}

{{/* Selector labels of a per-site workload: (list $ "component" site). */}}
{{- define "picospec.siteSelectorLabels" -}}
{{- $site := index . 2 -}}
{{ include "picospec.selectorLabels" (list (index . 0) (index . 1)) }}
{{- if $site.name }}
{{ (index . 0).Values.edge.siteLabel }}: {{ $site.name }}
{{- end }}
{{- end }}

{{- define "picospec.siteLabels" -}}
{{- $site := index . 2 -}}
{{ include "picospec.labels" (list (index . 0) (index . 1)) }}
{{- if $site.name }}
{{ (index . 0).Values.edge.siteLabel }}: {{ $site.name }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- NATS credentials as files */}}
{{/* The TLS Secret a service pod needs to verify the hub ("" when it does not talk TLS):
(list $ onEdge site). Edge pods talk to their node's leaf node (loopback, no TLS) unless
leafNode.enabled is false. */}}
{{- define "picospec.serviceTlsSecret" -}}
{{- $root := index . 0 }}
{{- $onEdge := index . 1 }}
{{- $site := index . 2 }}
{{- if $root.Values.tls.enabled }}
{{- if not $onEdge }}{{ include "picospec.hubTlsSecret" $root }}
{{- else if not $root.Values.leafNode.enabled }}{{ $site.tlsSecret }}
{{- end }}
{{- end }}
{{- end }}

{{- define "picospec.hubTlsSecret" -}}
{{- .Values.tls.hub.secretName | default (printf "%s-nats-tls" (include "picospec.fullname" . | trunc 50 | trimSuffix "-")) }}
{{- end }}

{{/* NATS settings of a PicoSpec service: (dict "root" $ "role" "drafter" "secret" name "tls" name).
Credentials are files from the Secret (PICOSPEC_NATS_USER_FILE, _PASSWORD_FILE), never env
values; the TLS CA is the ca.crt of the hub's (or the site's) TLS Secret. */}}
{{- define "picospec.natsAuthEnv" -}}
{{- $auth := .root.Values.natsAuth }}
{{- if $auth.credentialsSecret.name }}
- name: PICOSPEC_NATS_CREDS
  value: /etc/picospec/nats/{{ $auth.credentialsSecret.key }}
{{- else if $auth.enabled }}
- name: PICOSPEC_NATS_USER_FILE
  value: /etc/picospec/nats-auth/user
- name: PICOSPEC_NATS_PASSWORD_FILE
  value: /etc/picospec/nats-auth/password
{{- end }}
{{- if .tls }}
- name: PICOSPEC_NATS_TLS_CA
  value: /etc/picospec/nats-tls/ca.crt
{{- end }}
{{- end }}

{{- define "picospec.natsCredsMount" -}}
{{- $auth := .root.Values.natsAuth }}
{{- if $auth.credentialsSecret.name }}
- name: nats-creds
  mountPath: /etc/picospec/nats
  readOnly: true
{{- else if $auth.enabled }}
- name: nats-auth
  mountPath: /etc/picospec/nats-auth
  readOnly: true
{{- end }}
{{- if .tls }}
- name: nats-tls
  mountPath: /etc/picospec/nats-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "picospec.natsCredsVolume" -}}
{{- $auth := .root.Values.natsAuth }}
{{- if $auth.credentialsSecret.name }}
- name: nats-creds
  secret:
    secretName: {{ $auth.credentialsSecret.name }}
    defaultMode: 0440
{{- else if $auth.enabled }}
- name: nats-auth
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
    items:
      - {key: {{ .role }}-user, path: user}
      - {key: {{ .role }}-password, path: password}
{{- end }}
{{- if .tls }}
- name: nats-tls
  secret:
    secretName: {{ .tls }}
    defaultMode: 0444
    items:
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end }}

{{/* A NATS server's login files: (list $ (list (list secretName key VAR) ...)) -> a projected
volume whose files are named after the config variables they define. */}}
{{- define "picospec.natsServerAuthVolume" -}}
{{- $sources := dict }}
{{- range $item := index . 1 }}
{{- $items := get $sources (index $item 0) | default list }}
{{- $_ := set $sources (index $item 0) (append $items (dict "key" (index $item 1) "path" (index $item 2))) }}
{{- end -}}
- name: nats-secrets
  projected:
    defaultMode: 0440
    sources:
      {{- range $name := keys $sources | sortAlpha }}
      - secret:
          name: {{ $name }}
          items:
            {{- toYaml (get $sources $name) | nindent 12 }}
      {{- end }}
- name: nats-auth
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}

{{/* The init container that turns a NATS server's login files into nats-server variables
(/etc/nats-auth/vars.conf, on a memory volume): no secret in the environment or the ConfigMap.
With HUB_URLS (a leaf node), also PICOSPEC_HUB_URL_<n>: each hub URL with the leaf login
(files LEAF_USER and LEAF_PASSWORD).
Call with (list $ image hubUrls). */}}
{{- define "picospec.natsAuthInit" -}}
{{- $root := index . 0 -}}
- name: nats-auth
  image: {{ index . 1 }}
  imagePullPolicy: IfNotPresent
  command: ["/bin/sh", "-c"]
  args:
    - |
      set -eu
      umask 077
      out="$AUTH_DIR/vars.conf"
      : > "$out.tmp"
      for f in "$SECRET_DIR"/PICOSPEC_*; do
        [ -e "$f" ] || continue
        v="$(cat "$f")"
        case "$v" in
          ""|*[!A-Za-z0-9._-]*) echo "nats-auth: $(basename "$f"): use letters, digits, . _ - only" >&2; exit 1;;
        esac
        printf '%s: "%s"\n' "$(basename "$f")" "$v" >> "$out.tmp"
      done
      i=0
      for u in $HUB_URLS; do
        printf 'PICOSPEC_HUB_URL_%d: "%s://%s:%s@%s"\n' "$i" "${u%%://*}" \
          "$(cat "$SECRET_DIR/LEAF_USER")" "$(cat "$SECRET_DIR/LEAF_PASSWORD")" "${u#*://}" >> "$out.tmp"
        i=$((i + 1))
      done
      mv "$out.tmp" "$out"
  env:
    - name: SECRET_DIR
      value: /etc/nats-secrets
    - name: AUTH_DIR
      value: /etc/nats-auth
    - name: HUB_URLS
      value: {{ join " " (index . 2) | quote }}
  {{- include "picospec.securityContext" $root | nindent 2 }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 32Mi}
  volumeMounts:
    - name: nats-secrets
      mountPath: /etc/nats-secrets
      readOnly: true
    - name: nats-auth
      mountPath: /etc/nats-auth
{{- end }}

{{/* A NATS server's authorization block: (list $ users), each user a dict {var, perms, leaf}:
user $PICOSPEC_<var>_USER with password $PICOSPEC_<var>_PASSWORD (from vars.conf) and the
permissions given (files/nats-permissions.json, generated from picospec.protocol.subjects); a
leaf user may log in on the leaf-node port only. */}}
{{- define "picospec.natsUsers" -}}
{{- $root := index . 0 }}
{{- if $root.Values.natsAuth.enabled }}
# /etc/nats-auth/vars.conf (include paths are relative to this file, /etc/nats/nats.conf)
include "../nats-auth/vars.conf"
authorization {
  users = [
    {{- range $u := index . 1 }}
    {user: $PICOSPEC_{{ $u.var }}_USER, password: $PICOSPEC_{{ $u.var }}_PASSWORD, permissions: {{ $u.perms | toRawJson }}{{ if $u.leaf }}, allowed_connection_types: ["LEAFNODE"]{{ end }}}
    {{- end }}
  ]
}
{{- end }}
{{- end }}

{{/* A role's permissions, for one site (its subjects) or every site: (list $ role site). */}}
{{- define "picospec.permissions" -}}
{{- $perms := (index . 0).Files.Get "files/nats-permissions.json" | fromJson }}
{{- $site := index . 2 }}
{{- if and $site.name (hasKey $perms (printf "site:%s" (index . 1))) }}
{{- get $perms (printf "site:%s" (index . 1)) | toRawJson | replace "__SITE__" $site.name }}
{{- else }}
{{- get $perms (index . 1) | toRawJson }}
{{- end }}
{{- end }}

{{/* A NATS server's TLS block: (list certFile keyFile caFile verify timeout); "" for a file leaves it out. */}}
{{- define "picospec.natsTlsBlock" -}}
tls {
  {{- with index . 0 }}
  cert_file: "{{ . }}"
  {{- end }}
  {{- with index . 1 }}
  key_file: "{{ . }}"
  {{- end }}
  {{- with index . 2 }}
  ca_file: "{{ . }}"
  {{- end }}
  {{- if index . 3 }}
  verify: true
  {{- end }}
  timeout: {{ index . 4 }}
}
{{- end }}
{{/* ---------------------------------------------------------------- settings */}}
{{/* PICOSPEC_* env vars from the shared settings merged with a component's (component wins).
     Call with (list $ .Values.<component>.settings). */}}
{{- define "picospec.settingsEnv" -}}
{{- $root := index . 0 }}
{{- $merged := merge (deepCopy (index . 1)) (deepCopy $root.Values.settings) }}
{{- range $k := keys $merged | sortAlpha }}
{{- $v := index $merged $k }}
{{- if not (kindIs "invalid" $v) }}
- name: PICOSPEC_{{ upper $k }}
  value: {{ toString $v | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's effective setting. Call with (list $ .Values.<component>.settings "port"). */}}
{{- define "picospec.setting" -}}
{{- $root := index . 0 }}
{{- $merged := merge (deepCopy (index . 1)) (deepCopy $root.Values.settings) }}
{{- index $merged (index . 2) }}
{{- end }}

{{/* Is a model name a Hub id (to download), rather than the embedded model or a path? */}}
{{- define "picospec.isHubModel" -}}
{{- $m := toString . }}
{{- if not (or (has $m (list "smollm2" "default")) (hasPrefix "/" $m) (hasPrefix "." $m) (hasPrefix "~" $m) (hasSuffix ".gguf" $m)) }}true{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------- placement */}}
{{/* Node affinity keeping a pod on cloud nodes. Call with (list $ extraExpressions). */}}
{{- define "picospec.cloudNodeAffinity" -}}
{{- $root := index . 0 -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: {{ $root.Values.edge.nodeRoleLabel }}
            operator: DoesNotExist
          {{- with index . 1 }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
{{- end }}

{{/* Node affinity pinning a pod to KubeEdge edge nodes. Call with (list $). */}}
{{- define "picospec.edgeNodeAffinity" -}}
{{- $root := index . 0 -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: {{ $root.Values.edge.nodeRoleLabel }}
            operator: Exists
          {{- with $root.Values.edge.extraMatchExpressions }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
{{- end }}

{{/* Affinity block: node affinity plus any pod (anti-)affinity from values. */}}
{{- define "picospec.affinity" -}}
{{- $nodeAff := index . 0 }}
{{- $extra := index . 1 -}}
affinity:
{{- $nodeAff | nindent 2 }}
{{- with $extra.podAffinity }}
  podAffinity:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- with $extra.podAntiAffinity }}
  podAntiAffinity:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end }}

{{- define "picospec.edgeNetwork" -}}
{{- if eq .Values.edge.network "hostNetwork" }}
hostNetwork: true
dnsPolicy: {{ default "ClusterFirstWithHostNet" .Values.edge.dnsPolicy }}
{{- else if .Values.edge.dnsPolicy }}
dnsPolicy: {{ .Values.edge.dnsPolicy }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- pods */}}
{{- define "picospec.podSecurityContext" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{- define "picospec.securityContext" -}}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end }}

{{- define "picospec.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* HTTP probes of a PicoSpec service. Call with (list componentValues port). */}}
{{- define "picospec.probes" -}}
{{- $c := index . 0 }}
{{- $port := index . 1 -}}
startupProbe:
  httpGet: {path: /ready, port: {{ $port }}}
  {{- toYaml $c.startupProbe | nindent 2 }}
livenessProbe:
  httpGet: {path: /health, port: {{ $port }}}
  {{- toYaml $c.livenessProbe | nindent 2 }}
readinessProbe:
  httpGet: {path: /ready, port: {{ $port }}}
  {{- toYaml $c.readinessProbe | nindent 2 }}
{{- end }}

{{/* The Hub download init container. Call with (list $ componentValues image). */}}
{{- define "picospec.modelDownload" -}}
{{- $root := index . 0 }}
{{- $c := index . 1 }}
{{- $image := index . 2 }}
{{- $model := toString $c.settings.model -}}
- name: model-download
  image: {{ $image }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["python", "-c"]
  args:
    - |
      import json, os
      from huggingface_hub import snapshot_download
      path = snapshot_download(
          os.environ["MODEL"],
          revision=os.environ["REVISION"],
          allow_patterns=json.loads(os.environ["ALLOW_PATTERNS"]),
      )
      print(json.dumps({"event": "model_downloaded", "model": os.environ["MODEL"], "path": path}))
  env:
    - name: MODEL
      value: {{ $model | quote }}
    - name: REVISION
      value: {{ $c.modelDownload.revision | quote }}
    - name: ALLOW_PATTERNS
      value: {{ toJson $c.modelDownload.allowPatterns | quote }}
    - name: HF_HOME
      value: {{ $c.modelCache.mountPath }}
    - name: HOME
      value: /tmp
    {{- with $c.modelDownload.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $c.modelDownload.tokenSecret.key }}
    {{- end }}
  {{- include "picospec.securityContext" $root | nindent 2 }}
  resources:
    requests: {cpu: 500m, memory: 1Gi}
    limits: {memory: 4Gi}
  volumeMounts:
    - name: model-cache
      mountPath: {{ $c.modelCache.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* Env every PicoSpec container gets: caches on writable volumes, offline Hub. */}}
{{- define "picospec.runtimeEnv" -}}
{{- $c := . -}}
- name: HF_HOME
  value: {{ $c.modelCache.mountPath }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
- name: NODE_NAME
  valueFrom:
    fieldRef: {fieldPath: spec.nodeName}
{{- end }}

{{/* `include` output re-indented like nindent, or nothing at all when it is empty (no stray
     blank lines). Call with (list indent text). */}}
{{- define "picospec.nindent" -}}
{{- $s := index . 1 | trim }}
{{- if $s }}{{ $s | nindent (index . 0) }}{{ end }}
{{- end }}
