# SPDX-License-Identifier: ISC
#
# Install rules for everything that is not a program (systemd units,
# sysusers.d and tmpfiles.d snippets, the default config, the docs) and the
# CPack settings of the Debian package: `cpack -G DEB` in the build
# directory writes troupe_<version>_amd64.deb.  Included once, at the end
# of the top-level CMakeLists.txt (`include(units/packaging.cmake)`); the
# programs' own install() rules live beside them (DESTINATION bin).
#
# The system integration files go to absolute paths, where systemd looks
# for them whatever the prefix; the package is built with prefix /usr,
# which the units' ExecStart=/usr/bin/... expect.  It must never install
# /etc/troupe/jwt-secret: the postinst writes a random one per machine.

set(TROUPE_UNITDIR "/lib/systemd/system" CACHE PATH
	"Where the systemd units are installed")
set(TROUPE_SYSUSERSDIR "/usr/lib/sysusers.d" CACHE PATH
	"Where the sysusers.d snippet is installed")
set(TROUPE_TMPFILESDIR "/usr/lib/tmpfiles.d" CACHE PATH
	"Where the tmpfiles.d snippet is installed")
set(TROUPE_CONFDIR "/etc/troupe" CACHE PATH
	"Where the config file is installed")
set(TROUPE_DOCDIR "share/doc/troupe")

set(_u ${CMAKE_CURRENT_LIST_DIR})
set(_top ${CMAKE_CURRENT_LIST_DIR}/..)

install(FILES
	${_u}/troupe.target
	${_u}/troupe-edge.socket
	${_u}/troupe-edge.service
	${_u}/troupe-auth.service
	${_u}/troupe-dispatcher.service
	${_u}/troupe-storage.service
	${_u}/troupe-telemetry.service
	DESTINATION ${TROUPE_UNITDIR})
install(FILES ${_u}/troupe.sysusers DESTINATION ${TROUPE_SYSUSERSDIR}
	RENAME troupe.conf)
install(FILES ${_u}/troupe.tmpfiles DESTINATION ${TROUPE_TMPFILESDIR}
	RENAME troupe.conf)
# The installed config: etc/troupe.conf.example, but PostgreSQL through
# its unix socket, where Debian's pg_hba.conf lets the OS user troupe in as
# role troupe (peer) without a password; over 127.0.0.1 it would need one.
# A conffile (listed in the control archive's conffiles below): dpkg keeps
# the operator's edits on upgrade.
file(READ ${_top}/etc/troupe.conf.example _conf)
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS
	${_top}/etc/troupe.conf.example)
set(_pg_tcp "postgres = host=127.0.0.1 port=5432 dbname=troupe user=troupe")
set(_pg_unix "postgres = host=/run/postgresql dbname=troupe user=troupe")
string(FIND "${_conf}" "${_pg_tcp}" _at)
if(_at EQUAL -1)
	message(WARNING "etc/troupe.conf.example: no \"${_pg_tcp}\" line; "
		"the packaged troupe.conf keeps its [storage] postgres")
endif()
string(REPLACE "${_pg_tcp}" "${_pg_unix}" _conf "${_conf}")
file(WRITE ${CMAKE_BINARY_DIR}/debian/troupe.conf "${_conf}")
install(FILES ${CMAKE_BINARY_DIR}/debian/troupe.conf
	DESTINATION ${TROUPE_CONFDIR})

install(FILES ${_top}/README.md ${_top}/etc/troupe.conf.example
	DESTINATION ${TROUPE_DOCDIR})
install(DIRECTORY ${_top}/docs/ DESTINATION ${TROUPE_DOCDIR}
	FILES_MATCHING PATTERN "*.md")

# ---------------------------------------------------------------- CPack DEB
set(CPACK_GENERATOR "DEB")
set(CPACK_PACKAGE_NAME "troupe")
set(CPACK_PACKAGE_VENDOR "Troupe")
set(CPACK_PACKAGE_CONTACT "Troupe maintainers <troupe@localhost>")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
	"self-hosted bot gateway (Coze-compatible chat API)")
set(CPACK_PACKAGE_DESCRIPTION
	"Troupe serves a chat API in front of LLM upstreams with a few small\n\
C processes (edge, auth, dispatcher and its workers, storage, telemetry)\n\
run as sandboxed systemd units. It keeps conversations in Redis and\n\
PostgreSQL.")
set(CPACK_PACKAGING_INSTALL_PREFIX "/usr")
set(CPACK_STRIP_FILES OFF)

set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_ARCHITECTURE amd64)
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
# Shared libraries through dpkg-shlibdeps (libnng1, libmsgpackc2,
# libhiredis0.14, libpq5, libsystemd0, libcurl4, libcjson1,
# libh2o-evloop0.13, libssl3, ...); plus what the units and scripts run:
# systemd (sysusers, tmpfiles) and procps (/bin/kill for ExecReload=).
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "systemd (>= 252), procps")
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "redis-server, postgresql")

set(_conffiles ${CMAKE_BINARY_DIR}/debian/conffiles)
file(WRITE ${_conffiles} "${TROUPE_CONFDIR}/troupe.conf\n")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
	${_conffiles} ${_u}/debian/postinst ${_u}/debian/prerm
	${_u}/debian/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION TRUE)

include(CPack)
