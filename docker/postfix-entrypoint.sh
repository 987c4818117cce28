#!/bin/sh
# Postfix for docker/compose.yml: mail for RELAY_DOMAINS goes through the filter container
# (content_filter) and comes back on the reinjection smtpd (:10025), which also takes the
# viewer's releases; then it is relayed to RELAY_NEXT_HOP. These are the settings that
# `manage.py runfilter --postfix-config` (and `manage.py postfixconfig`) print, with
# container names for 127.0.0.1. RELAY_DOMAINS and RELAY_NEXT_HOP are the variables of
# docs/configuration.md.
set -eu
: "${MAIL_HOSTNAME:?set MAIL_HOSTNAME}" "${RELAY_DOMAINS:?set RELAY_DOMAINS}"
: "${RELAY_NEXT_HOP:?set RELAY_NEXT_HOP (the real mail server: host, host:port, [address]:port)}"
case "$RELAY_NEXT_HOP" in
  \[*) NEXT_HOP=$RELAY_NEXT_HOP ;;
  *:*) NEXT_HOP="[${RELAY_NEXT_HOP%:*}]:${RELAY_NEXT_HOP##*:}" ;;
  *) NEXT_HOP="[$RELAY_NEXT_HOP]" ;;
esac
SUBNET=${SPAMVIEWER_SUBNET:-172.30.53.0/24}
MAP=/etc/postfix/spamviewer/relay_recipients

postconf -e \
  "myhostname=$MAIL_HOSTNAME" \
  "mydestination=" \
  "mynetworks=127.0.0.0/8 $SUBNET" \
  "relay_domains=$RELAY_DOMAINS" \
  "relay_transport=relay:$NEXT_HOP" \
  "content_filter=spamviewer:[filter]:10024" \
  "receive_override_options=no_address_mappings" \
  "maillog_file=/dev/stdout" \
  "smtpd_relay_restrictions=permit_mynetworks,reject_unauth_destination"
# The relay map written by the Celery worker (directory sync), read without postmap. With
# the directory configured it is used before its first write too: until the first sync
# writes it, Postfix answers 4xx (temporary lookup failure) and senders try again, rather
# than taking mail for addresses that may not exist.
if [ -n "${LDAP_SERVER:-}" ] || [ -e "$MAP" ]; then
  postconf -e "relay_recipient_maps=texthash:$MAP"
  # An smtpd reads a texthash map once, when it starts: reload Postfix after each write
  # (a write replaces the file, so its inode number changes).
  (
    seen=$(stat -c '%i %Y' "$MAP" 2>/dev/null || echo none)
    while sleep 30; do
      now=$(stat -c '%i %Y' "$MAP" 2>/dev/null || echo none)
      if [ "$now" != "$seen" ] && postfix reload >/dev/null 2>&1; then
        seen=$now
      fi
    done
  ) &
fi

postconf -M "spamviewer/unix=spamviewer unix - - n - 100 smtp"
for option in smtp_send_xforward_command=yes disable_mime_output_conversion=yes \
              smtp_generic_maps= smtp_data_done_timeout=660; do
  postconf -P "spamviewer/unix/$option"
done
postconf -M "10025/inet=10025 inet n - n - - smtpd"
for option in content_filter= \
    receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters \
    smtpd_client_restrictions=permit_mynetworks,reject smtpd_helo_restrictions= \
    smtpd_sender_restrictions= smtpd_relay_restrictions=permit_mynetworks,reject \
    smtpd_recipient_restrictions=permit_mynetworks,reject smtpd_data_restrictions= \
    smtpd_end_of_data_restrictions= "mynetworks=127.0.0.0/8,$SUBNET" \
    "smtpd_authorized_xforward_hosts=127.0.0.0/8,$SUBNET" smtpd_milters= \
    local_recipient_maps= relay_recipient_maps= smtpd_error_sleep_time=0 \
    smtpd_soft_error_limit=1001 smtpd_hard_error_limit=1000 \
    smtpd_client_connection_count_limit=0 smtpd_client_connection_rate_limit=0; do
  postconf -P "10025/inet/$option"
done

exec postfix start-fg
