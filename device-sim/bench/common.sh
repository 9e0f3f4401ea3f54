# Shared by the benchmark scripts: ports on loopback and the nginx mTLS WebSocket proxy.
# shellcheck shell=bash

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {  # $1 port, $2 (optional) a pid that must stay alive meanwhile
  until python3 -c "import socket; socket.create_connection(('127.0.0.1',$1))" 2>/dev/null; do
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then echo "the process under test exited before listening"; exit 1; fi
    sleep 0.1
  done
}

# nginx as an mTLS WebSocket proxy doing what it can of Gatehouse's job: client certificate
# required and verified against the CA and the CRL, TLS 1.3, the client DN in a header.
#   nginx_conf DIR LISTEN_PORT INGEST_PORT [ECHO_PORT]  > DIR/nginx.conf   (pki in DIR/pki)
nginx_conf() {
  local w=$1 port=$2 ingest=$3 echo_port=${4:-}
  local proxy="proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header x-gatehouse-device-id \$ssl_client_s_dn;
      proxy_read_timeout 3600s;"
  local echo_location=""
  if [ -n "$echo_port" ]; then
    echo_location="location /echo {
      proxy_pass http://127.0.0.1:$echo_port;
      $proxy
    }"
  fi
  cat <<NGINX
worker_processes auto;
worker_rlimit_nofile 20000;
pid $w/nginx.pid;
error_log $w/nginx-error.log warn;
events { worker_connections 19000; }
http {
  access_log off;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
  server {
    listen 127.0.0.1:$port ssl;
    ssl_certificate $w/pki/server.pem;
    ssl_certificate_key $w/pki/server.key;
    ssl_client_certificate $w/pki/ca.pem;
    ssl_crl $w/pki/crl.pem;
    ssl_verify_client on;
    ssl_protocols TLSv1.3;
    location / {
      proxy_pass http://127.0.0.1:$ingest;
      $proxy
    }
    $echo_location
  }
}
NGINX
}
