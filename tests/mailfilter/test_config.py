import pytest

from mailfilter.config import ConfigError, FilterConfig


def test_defaults_are_the_content_filter_layout():
    config = FilterConfig.from_env({})
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 10024)
    assert (config.next_hop_host, config.next_hop_port) == ("127.0.0.1", 10025)
    assert config.mode == "content_filter" and not config.lmtp
    assert config.max_recipients == 1000
    assert not config.metrics_enabled


def test_every_variable_is_read():
    config = FilterConfig.from_env({
        "FILTER_LISTEN": "[::1]:2525",
        "FILTER_NEXT_HOP": "mx.internal:26",
        "FILTER_MODE": "front",
        "FILTER_RELAY_DOMAINS": "example.test",
        "FILTER_LMTP": "True",
        "FILTER_MAX_MESSAGE_SIZE": "2048",
        "FILTER_MAX_LINE_LENGTH": "2000",
        "FILTER_MAX_HEADER_COUNT": "50",
        "FILTER_MAX_RECIPIENTS": "10",
        "FILTER_COMMAND_TIMEOUT": "1.5",
        "FILTER_DATA_TIMEOUT": "2",
        "FILTER_MAX_CLIENTS": "7",
        "FILTER_MAX_PER_IP": "3",
        "FILTER_MAX_COMMANDS": "99",
        "FILTER_BARE_LF": "normalize",
        "FILTER_METRICS_LISTEN": "127.0.0.1:9100",
    })
    assert (config.listen_host, config.listen_port) == ("::1", 2525)
    assert (config.next_hop_host, config.next_hop_port) == ("mx.internal", 26)
    assert config.mode == "front" and config.lmtp
    assert (config.max_message_size, config.max_line_length, config.max_header_count) == (
        2048, 2000, 50)
    assert (config.max_recipients, config.max_clients, config.max_per_ip) == (10, 7, 3)
    assert (config.command_timeout, config.data_timeout, config.max_commands) == (1.5, 2.0, 99)
    assert config.bare_lf == "normalise"
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", 9100)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FILTER_LISTEN", "10024"),
        ("FILTER_NEXT_HOP", "host:port"),
        ("FILTER_MODE", "sideways"),
        ("FILTER_LMTP", "maybe"),
        ("FILTER_MAX_RECIPIENTS", "many"),
        ("FILTER_MAX_RECIPIENTS", "0"),
        ("FILTER_COMMAND_TIMEOUT", "soon"),
        ("FILTER_BARE_LF", "ignore"),
        ("FILTER_METRICS_LISTEN", "nowhere"),
        ("FILTER_XFORWARD_HOSTS", "not-a-network"),
    ],
)
def test_bad_value_stops_the_start_with_the_variable_named(name, value):
    with pytest.raises(ConfigError, match=name):
        FilterConfig.from_env({name: value})


def test_xforward_is_allowed_only_from_the_listed_networks():
    config = FilterConfig(xforward_hosts=("127.0.0.0/8", "2001:db8::/32"))
    assert config.xforward_allowed("127.0.0.2")
    assert config.xforward_allowed("2001:db8::1")
    assert not config.xforward_allowed("192.0.2.1")
    assert not config.xforward_allowed("")
